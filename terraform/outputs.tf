output "router_url" {
  description = "The load balancer's own address; point domain_name at it (a CNAME or an alias)."
  value       = module.routers.url
}

output "url" {
  description = "KILN_URL: where customers, the CLI and the console reach the platform."
  value       = local.url
}

output "load_balancer_dns_name" {
  value = module.routers.load_balancer_dns_name
}

output "bucket" {
  description = "Where code and snapshots live (KILN_STORE_URL)."
  value       = module.data.bucket
}

output "store_url" {
  value = local.settings.KILN_STORE_URL
}

output "nats_url" {
  value = module.nats.url
}

output "settings" {
  description = "The KILN_* settings every process gets (secrets are fetched at boot, not here)."
  value       = local.settings
}

output "secret_arns" {
  description = "The secrets the operator fills in (docs/production.md): NATS's and Stripe's."
  value = {
    nats_server   = module.secrets.nats_secret_arns["server"]
    nats_platform = module.secrets.nats_secret_arns["platform"]
    nats_tls      = module.secrets.nats_secret_arns["tls"]
    stripe        = module.secrets.stripe_secret_arn
  }
}

output "gpu_autoscaling_groups" {
  value = module.gpu_nodes.autoscaling_group_names
}
