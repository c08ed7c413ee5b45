variable "name" {
  description = "Name of the group and its instances."
  type        = string
}

variable "part" {
  description = "What runs: python -m kiln.<part>."
  type        = string
  validation {
    condition     = contains(["router", "scheduler", "billing", "invoker"], var.part)
    error_message = "part is one of router, scheduler, billing, invoker."
  }
}

variable "user" {
  description = "The system user the process runs as."
  type        = string
  default     = "kiln"
}

variable "region" {
  type = string
}

variable "package" {
  description = "What pip installs: Kiln and the extras this part needs, pinned."
  type        = string
}

variable "settings" {
  description = "KILN_* settings that are not secret."
  type        = map(string)
}

variable "secrets" {
  description = "Secrets Manager ARNs: kiln, nats_platform, and database, redis, stripe where used."
  type        = map(string)
}

variable "database_host" {
  type    = string
  default = ""
}

variable "redis_host" {
  type    = string
  default = ""
}

variable "ami_id" {
  type = string
}

variable "root_device_name" {
  description = "The AMI's root device."
  type        = string
  default     = "/dev/sda1"
}

variable "instance_type" {
  type = string
}

variable "volume_gb" {
  type    = number
  default = 30
}

variable "min_size" {
  type = number
}

variable "max_size" {
  type = number
  validation {
    condition     = var.max_size >= 1 && var.max_size >= var.min_size
    error_message = "max_size must be at least 1 and at least min_size."
  }
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

variable "target_group_arns" {
  type    = list(string)
  default = []
}

variable "stop_timeout_s" {
  description = "systemd's TimeoutStopSec: KILN_SHUTDOWN_TIMEOUT plus room to close."
  type        = number
  default     = 45
}

variable "start_now" {
  description = "Start the process at first boot (false: a later step starts it)."
  type        = bool
  default     = true
}

variable "extra_commands" {
  description = "More cloud-init runcmd entries (each a list of words)."
  type        = list(list(string))
  default     = []
}

variable "kms_key_arn" {
  type    = string
  default = null
}

variable "extra_files" {
  description = "More files cloud-init writes (path to content; mode 0755)."
  type        = map(string)
  default     = {}
}

variable "spot" {
  description = "Run the group on spot capacity."
  type        = bool
  default     = false
}

variable "spot_instance_types" {
  description = "The types a spot group may use (the first is the launch template's)."
  type        = list(string)
  default     = []
}

variable "warm_pool_size" {
  description = "Stopped instances kept ready beside the group (0: none)."
  type        = number
  default     = 0
}

variable "termination_hook_timeout_s" {
  description = "How long a terminating instance may take to drain (null: no hook)."
  type        = number
  default     = null
}

variable "os_packages" {
  description = "More Debian/Ubuntu packages the host needs (beside python3-venv)."
  type        = list(string)
  default     = []
}
