output "autoscaling_group_name" {
  value = aws_autoscaling_group.this.name
}

output "launch_template_id" {
  value = aws_launch_template.this.id
}

output "user_data" {
  description = "The rendered cloud-init (no secrets: they are fetched at boot)."
  value       = local.user_data
}
