variable "name" {
  description = "Prefix of every resource's name (lowercase letters, digits and hyphens)."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name is 2 to 21 lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "region" {
  description = "The AWS region."
  type        = string
}

variable "kiln_version" {
  description = "The Kiln release every process runs (pip's version)."
  type        = string
}

variable "domain_name" {
  description = "The platform's host name (the certificate's); KILN_URL is https:// and it."
  type        = string
}

variable "certificate_arn" {
  description = "The ACM certificate for domain_name, in the region."
  type        = string
}

variable "availability_zones" {
  description = "Three zones (null: the region's first three)."
  type        = list(string)
  default     = null
}

variable "vpc_cidr" {
  type    = string
  default = "10.40.0.0/16"
}

variable "single_nat_gateway" {
  description = "One NAT gateway instead of one per zone (cheaper, less available)."
  type        = bool
  default     = false
}

variable "public_cidrs" {
  description = "Who may reach the platform over HTTPS."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "monitoring_cidr" {
  description = "Where Prometheus scrapes from (null: the VPC)."
  type        = string
  default     = null
}

variable "router_port" {
  type    = number
  default = 8000
}

variable "router_min" {
  type    = number
  default = 2
}

variable "router_max" {
  type    = number
  default = 6
  validation {
    condition     = var.router_max >= var.router_min
    error_message = "router_max must be at least router_min."
  }
}

variable "scheduler_count" {
  description = "Schedulers: one acts, the others stand by."
  type        = number
  default     = 2
  validation {
    condition     = var.scheduler_count >= 2 && var.scheduler_count <= 3
    error_message = "Run two or three schedulers: one acts, the others take over within a lease."
  }
}

variable "billing_count" {
  type    = number
  default = 2
  validation {
    condition     = var.billing_count >= 1
    error_message = "billing_count must be at least 1."
  }
}

variable "gpu_instance_type" {
  description = "The GPU hosts' instance type (families g4dn, g5, g6, g6e, gr6, p4d, p4de, p5, p5e, p5en)."
  type        = string
  default     = "g6e.xlarge"
}

variable "gpu_spot_alternatives" {
  description = "Other GPU types the spot group may take."
  type        = list(string)
  default     = []
}

variable "gpu_min" {
  type    = number
  default = 1
}

variable "gpu_max" {
  type    = number
  default = 4
  validation {
    condition     = var.gpu_max >= var.gpu_min
    error_message = "gpu_max must be at least gpu_min."
  }
}

variable "gpu_warm_pool" {
  description = "Stopped GPU instances kept with their snapshot caches, ready to start."
  type        = number
  default     = 1
  validation {
    condition     = var.gpu_warm_pool >= 0
    error_message = "gpu_warm_pool must be 0 or more."
  }
}

variable "gpu_spot_max" {
  description = "The most spot GPU instances (0: no spot group)."
  type        = number
  default     = 0
}

variable "gpu_cache_gb" {
  description = "Each GPU host's disk, the snapshot cache's room."
  type        = number
  default     = 300
}

variable "gpu_ami_id" {
  description = "An AMI with the NVIDIA driver (null: the latest Deep Learning Base AMI)."
  type        = string
  default     = null
}

variable "service_ami_id" {
  description = "The AMI of the CPU services and NATS (null: the latest Ubuntu 24.04)."
  type        = string
  default     = null
}

variable "router_instance_type" {
  type    = string
  default = "c7i.large"
}

variable "scheduler_instance_type" {
  type    = string
  default = "t3.medium"
}

variable "billing_instance_type" {
  type    = string
  default = "t3.medium"
}

variable "nats_instance_type" {
  type    = string
  default = "m7i.large"
}

variable "jetstream_gb" {
  type    = number
  default = 100
}

variable "db_instance_class" {
  type    = string
  default = "db.m7g.large"
}

variable "db_storage_gb" {
  type    = number
  default = 100
}

variable "redis_node_type" {
  type    = string
  default = "cache.m7g.large"
}

variable "bucket_name" {
  description = "The bucket for code and snapshots (null: <name>-store-<region>)."
  type        = string
  default     = null
}

variable "kms_key_arn" {
  description = "A customer-managed KMS key for volumes, the database, Redis, the bucket and the secrets (null: AWS's)."
  type        = string
  default     = null
}

variable "deletion_protection" {
  description = "Keep the database, the bucket and the load balancer from being destroyed with the stack."
  type        = bool
  default     = true
}

variable "extra_settings" {
  description = "More KILN_* settings for every process (not secrets: those go in Secrets Manager)."
  type        = map(string)
  default     = {}
}
