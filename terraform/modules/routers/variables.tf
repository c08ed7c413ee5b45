variable "name" {
  type = string
}

variable "region" {
  type = string
}

variable "vpc_id" {
  type = string
}

variable "public_subnet_ids" {
  type = list(string)
}

variable "private_subnet_ids" {
  type = list(string)
}

variable "alb_security_group_id" {
  type = string
}

variable "router_security_group_id" {
  type = string
}

variable "certificate_arn" {
  description = "The ACM certificate of the platform's host name."
  type        = string
}

variable "router_port" {
  type = number
}

variable "idle_timeout_s" {
  description = "How long the load balancer keeps an idle connection (a WebSocket between frames)."
  type        = number
  default     = 300
}

variable "drain_s" {
  description = "How long a leaving router keeps its connections (KILN_SHUTDOWN_TIMEOUT)."
  type        = number
  default     = 30
}

variable "deletion_protection" {
  type    = bool
  default = true
}

variable "access_log_bucket" {
  description = "A bucket for the load balancer's access logs (null: none)."
  type        = string
  default     = null
}

variable "package" {
  type = string
}

variable "settings" {
  type = map(string)
}

variable "secrets" {
  type = map(string)
}

variable "database_host" {
  type = string
}

variable "redis_host" {
  type = string
}

variable "ami_id" {
  type = string
}

variable "instance_type" {
  type = string
}

variable "min_size" {
  type = number
  validation {
    condition     = var.min_size >= 2
    error_message = "Run at least two routers, in different zones: one can be replaced while the other serves."
  }
}

variable "max_size" {
  type = number
}

variable "instance_profile" {
  type = string
}

variable "target_cpu_percent" {
  type    = number
  default = 60
}

variable "kms_key_arn" {
  type    = string
  default = null
}
