variable "name" {
  description = "Prefix of every name."
  type        = string
}

variable "bucket" {
  description = "The bucket holding code and snapshots."
  type        = string
}

variable "prefix" {
  description = "The prefix in the bucket (KILN_STORE_URL's path)."
  type        = string
}

variable "secret_arns" {
  description = "By tier (router, scheduler, billing, gpu_node, nats): the secrets it may read."
  type        = map(list(string))
}

variable "kms_key_arn" {
  description = "The bucket's KMS key, when it has one."
  type        = string
  default     = null
}
