variable "name" {
  type = string
}

variable "region" {
  type = string
}

variable "instance_type" {
  description = "The GPU instance type of the on-demand group."
  type        = string
  validation {
    condition     = contains(["g4dn", "g5", "g6", "g6e", "gr6", "p4d", "p4de", "p5", "p5e", "p5en"], split(".", var.instance_type)[0])
    error_message = "instance_type must be a GPU instance of the families g4dn, g5, g6, g6e, gr6, p4d, p4de, p5, p5e or p5en (such as g6e.xlarge)."
  }
}

variable "spot_alternatives" {
  description = "Other GPU types the spot group may take."
  type        = list(string)
  default     = []
}

variable "min_size" {
  type = number
}

variable "max_size" {
  type = number
  validation {
    condition     = var.max_size >= var.min_size
    error_message = "max_size must be at least min_size."
  }
}

variable "warm_pool_size" {
  description = "Stopped GPU instances kept ready, their snapshot caches on disk."
  type        = number
  default     = 1
}

variable "spot_max_size" {
  description = "The most spot GPU instances (0: no spot group)."
  type        = number
  default     = 0
}

variable "cache_gb" {
  description = "Each node's disk: the OS, the image's CUDA and the snapshot cache."
  type        = number
  default     = 300
}

variable "drain_s" {
  description = "How long a node agent may take to drain its replicas (KILN_SHUTDOWN_TIMEOUT)."
  type        = number
  default     = 300
}

variable "ami_id" {
  description = "An AMI with the NVIDIA driver (null: the latest Deep Learning Base AMI)."
  type        = string
  default     = null
}

variable "subnet_ids" {
  type = list(string)
}

variable "security_group_id" {
  type = string
}

variable "instance_profile" {
  type = string
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

variable "kms_key_arn" {
  type    = string
  default = null
}
