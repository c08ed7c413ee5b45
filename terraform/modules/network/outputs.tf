output "vpc_id" {
  value = aws_vpc.this.id
}

output "public_subnet_ids" {
  value = aws_subnet.public[*].id
}

output "private_subnet_ids" {
  value = aws_subnet.private[*].id
}

output "private_subnet_cidrs" {
  value = aws_subnet.private[*].cidr_block
}

output "security_group_ids" {
  description = "One per tier: alb, router, scheduler, billing, gpu_node, nats, database, redis."
  value       = { for tier, group in aws_security_group.tier : tier => group.id }
}
