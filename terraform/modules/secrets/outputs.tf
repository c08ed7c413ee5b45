output "kiln_secret_arn" {
  value = aws_secretsmanager_secret.kiln.arn
}

output "redis_secret_arn" {
  value = aws_secretsmanager_secret.redis.arn
}

output "redis_auth_token" {
  value     = aws_secretsmanager_secret_version.redis.secret_string
  sensitive = true
}

output "nats_secret_arns" {
  description = "server (the trust part of nats.conf), platform (the platform's creds), tls (PEM)."
  value       = { for part, secret in aws_secretsmanager_secret.nats : part => secret.arn }
}

output "stripe_secret_arn" {
  value = aws_secretsmanager_secret.stripe.arn
}
