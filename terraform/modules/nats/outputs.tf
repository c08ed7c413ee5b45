output "url" {
  description = "KILN_NATS_URL: every server, so a client finds another when one goes."
  value       = join(",", [for address in local.addresses : "tls://${address}:4222"])
}

output "addresses" {
  value = local.addresses
}
