# Kiln for production traffic: a NAT gateway per zone, a customer-managed KMS key for every
# volume, database, cache, bucket and secret, more routers, an on-demand GPU group with a warm
# pool beside a spot group over several GPU types, and HTTPS only from the networks allowed.

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
    tags = { "kiln:stack" = "complete" }
  }
}

variable "region" {
  type    = string
  default = "us-west-2"
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

variable "public_cidrs" {
  type    = list(string)
  default = ["0.0.0.0/0"]
}

data "aws_caller_identity" "current" {}

resource "aws_kms_key" "kiln" {
  description         = "Kiln: volumes, database, cache, bucket, secrets, logs"
  enable_key_rotation = true
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "Account"
        Effect    = "Allow"
        Principal = { AWS = "arn:aws:iam::${data.aws_caller_identity.current.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "CloudWatchLogs"
        Effect    = "Allow"
        Principal = { Service = "logs.${var.region}.amazonaws.com" }
        Action    = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
      },
    ]
  })
}

module "kiln" {
  source                = "../.."
  name                  = "kiln-prod"
  region                = var.region
  kiln_version          = var.kiln_version
  domain_name           = var.domain_name
  certificate_arn       = var.certificate_arn
  public_cidrs          = var.public_cidrs
  kms_key_arn           = aws_kms_key.kiln.arn
  router_min            = 3
  router_max            = 12
  scheduler_count       = 3
  billing_count         = 2
  jetstream_gb          = 500
  db_instance_class     = "db.r7g.xlarge"
  db_storage_gb         = 500
  redis_node_type       = "cache.r7g.large"
  gpu_instance_type     = "p5.48xlarge"
  gpu_min               = 2
  gpu_max               = 16
  gpu_warm_pool         = 2
  gpu_spot_max          = 16
  gpu_spot_alternatives = ["p5e.48xlarge", "p4de.24xlarge"]
  gpu_cache_gb          = 2000
  extra_settings = {
    KILN_INVOICE_ISSUER = "Example Compute Inc., 1 Market St, San Francisco CA"
  }
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
