variable "name" {
  description = "Prefix of every name."
  type        = string
}

variable "region" {
  description = "The AWS region (for the S3 endpoint's service name)."
  type        = string
}

variable "cidr" {
  description = "The VPC's address range; each subnet is a sixteenth of it."
  type        = string
  validation {
    condition     = can(cidrnetmask(var.cidr)) && tonumber(split("/", var.cidr)[1]) <= 20
    error_message = "cidr must be an IPv4 range of /20 or larger, such as 10.40.0.0/16."
  }
}

variable "availability_zones" {
  description = "Three zones of the region."
  type        = list(string)
  validation {
    condition     = length(var.availability_zones) >= 3
    error_message = "Kiln spreads over three availability zones: name at least three."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all zones (cheaper; a zone's outage cuts the others' egress)."
  type        = bool
  default     = false
}

variable "public_cidrs" {
  description = "Who may reach the load balancer's HTTPS port."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "monitoring_cidr" {
  description = "Where Prometheus scrapes from."
  type        = string
}

variable "router_port" {
  description = "The port routers listen on behind the load balancer."
  type        = number
}

variable "flow_log_retention_days" {
  description = "How long VPC flow logs are kept."
  type        = number
  default     = 365
}

variable "kms_key_arn" {
  description = "The key that encrypts the logs (null: CloudWatch's own)."
  type        = string
  default     = null
}
