# Kiln's secrets in Secrets Manager. The ones AWS can make are made here once (later runs
# keep them: `ignore_changes`); the NATS trust (operator JWT, account keys, credentials) is
# made by `kiln nats trust` and put in by the operator, as docs/production.md shows. The
# database password is RDS's own managed secret (the data module).

data "aws_secretsmanager_random_password" "value" {
  for_each            = toset(["signing_key", "api_key_pepper", "redis_auth_token"])
  password_length     = 48
  exclude_punctuation = true
}

resource "aws_secretsmanager_secret" "kiln" {
  name                    = "${var.name}/kiln"
  description             = "Kiln's own secrets: KILN_SNAPSHOT_SIGNING_KEY, KILN_API_KEY_PEPPER (JSON)"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.recovery_window_days
}

resource "aws_secretsmanager_secret_version" "kiln" {
  secret_id = aws_secretsmanager_secret.kiln.id
  secret_string = jsonencode({
    KILN_SNAPSHOT_SIGNING_KEY = data.aws_secretsmanager_random_password.value["signing_key"].random_password
    KILN_API_KEY_PEPPER       = data.aws_secretsmanager_random_password.value["api_key_pepper"].random_password
  })
  lifecycle {
    ignore_changes = [secret_string]
  }
}

resource "aws_secretsmanager_secret" "redis" {
  name                    = "${var.name}/redis-auth"
  description             = "The ElastiCache auth token (the password of rediss:// URLs)"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.recovery_window_days
}

resource "aws_secretsmanager_secret_version" "redis" {
  secret_id     = aws_secretsmanager_secret.redis.id
  secret_string = data.aws_secretsmanager_random_password.value["redis_auth_token"].random_password
  lifecycle {
    ignore_changes = [secret_string]
  }
}

resource "aws_secretsmanager_secret" "nats" {
  for_each                = toset(["server", "platform", "tls"])
  name                    = "${var.name}/nats-${each.key}"
  description             = "NATS ${each.key}: put in by the operator (docs/production.md)"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.recovery_window_days
}

resource "aws_secretsmanager_secret" "stripe" {
  name                    = "${var.name}/stripe"
  description             = "KILN_STRIPE_API_KEY and KILN_STRIPE_WEBHOOK_SECRET (JSON), put in by the operator"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.recovery_window_days
}
