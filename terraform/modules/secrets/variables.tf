variable "name" {
  description = "Prefix of every name."
  type        = string
}

variable "kms_key_arn" {
  description = "The key that encrypts the secrets (null: Secrets Manager's own)."
  type        = string
  default     = null
}

variable "recovery_window_days" {
  description = "How long a deleted secret can still be restored."
  type        = number
  default     = 30
}
