output "database_address" {
  value = aws_db_instance.postgres.address
}

output "database_secret_arn" {
  description = "RDS's managed secret: {username, password}."
  value       = aws_db_instance.postgres.master_user_secret[0].secret_arn
}

output "redis_address" {
  value = aws_elasticache_replication_group.redis.primary_endpoint_address
}

output "bucket" {
  value = aws_s3_bucket.store.bucket
}

output "bucket_arn" {
  value = aws_s3_bucket.store.arn
}
