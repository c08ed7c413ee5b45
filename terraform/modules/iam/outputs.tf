output "instance_profiles" {
  description = "By tier: the instance profile's name."
  value       = { for tier, profile in aws_iam_instance_profile.tier : tier => profile.name }
}

output "role_arns" {
  value = { for tier, role in aws_iam_role.tier : tier => role.arn }
}
