# The smallest Kiln on AWS that is still a real cluster: two routers, two schedulers, one
# billing service, the three-server NATS cluster, small managed PostgreSQL and Redis, one NAT
# gateway, and GPU capacity that scales from zero with one stopped node in the warm pool.
# `terraform apply -var domain_name=... -var certificate_arn=...` (see ../../README.md).

terraform {
  required_version = ">= 1.7"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
    }
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = { "kiln:stack" = "minimal" }
  }
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "domain_name" {
  type = string
}

variable "certificate_arn" {
  type = string
}

variable "kiln_version" {
  type    = string
  default = "0.9.0"
}

module "kiln" {
  source                  = "../.."
  name                    = "kiln-min"
  region                  = var.region
  kiln_version            = var.kiln_version
  domain_name             = var.domain_name
  certificate_arn         = var.certificate_arn
  single_nat_gateway      = true
  router_instance_type    = "t3.small"
  scheduler_instance_type = "t3.small"
  billing_instance_type   = "t3.small"
  billing_count           = 1
  nats_instance_type      = "t3.medium"
  jetstream_gb            = 20
  db_instance_class       = "db.t4g.micro"
  db_storage_gb           = 20
  redis_node_type         = "cache.t4g.micro"
  gpu_instance_type       = "g6.xlarge"
  gpu_min                 = 0
  gpu_max                 = 2
  gpu_warm_pool           = 1
  gpu_cache_gb            = 150
  deletion_protection     = false
}

output "url" {
  value = module.kiln.url
}

output "router_url" {
  value = module.kiln.router_url
}

output "secret_arns" {
  value = module.kiln.secret_arns
}
