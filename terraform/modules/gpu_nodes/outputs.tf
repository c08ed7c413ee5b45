output "autoscaling_group_names" {
  value = { for group, made in module.group : group => made.autoscaling_group_name }
}

output "user_data" {
  value = module.group["ondemand"].user_data
}
