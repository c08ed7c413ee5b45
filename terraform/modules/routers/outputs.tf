output "url" {
  value = "https://${aws_lb.this.dns_name}"
}

output "load_balancer_dns_name" {
  value = aws_lb.this.dns_name
}

output "load_balancer_zone_id" {
  value = aws_lb.this.zone_id
}

output "autoscaling_group_name" {
  value = module.routers.autoscaling_group_name
}

output "user_data" {
  value = module.routers.user_data
}
