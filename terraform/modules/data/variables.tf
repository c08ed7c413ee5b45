variable "name" {
  description = "Prefix of every name."
  type        = string
}

variable "subnet_ids" {
  description = "The private subnets, one per zone."
  type        = list(string)
}

variable "database_security_group_id" {
  type = string
}

variable "redis_security_group_id" {
  type = string
}

variable "db_instance_class" {
  description = "The RDS instance class."
  type        = string
}

variable "db_storage_gb" {
  description = "PostgreSQL's first allocation; it grows to four times this by itself."
  type        = number
  validation {
    condition     = var.db_storage_gb >= 20
    error_message = "db_storage_gb must be at least 20."
  }
}

variable "db_backup_days" {
  description = "Days of point-in-time recovery."
  type        = number
  default     = 14
}

variable "redis_node_type" {
  description = "The ElastiCache node type."
  type        = string
}

variable "redis_auth_token" {
  description = "The Redis password (from the secrets module)."
  type        = string
  sensitive   = true
}

variable "bucket" {
  description = "The name of the bucket for code and snapshots."
  type        = string
}

variable "prefix" {
  description = "The prefix Kiln uses in it."
  type        = string
}

variable "noncurrent_version_days" {
  description = "How long an overwritten or deleted object's old version is kept."
  type        = number
  default     = 30
}

variable "deletion_protection" {
  description = "Keep the database and the bucket from being destroyed with the stack."
  type        = bool
  default     = true
}

variable "kms_key_arn" {
  description = "A customer-managed key for the database, Redis and the bucket (null: AWS's)."
  type        = string
  default     = null
}
