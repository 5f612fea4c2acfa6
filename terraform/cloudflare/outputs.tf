output "preview_url_template" {
  description = "Set as WAKEGATE_PREVIEW_URL on waker and provisioner."
  value       = "https://{label}.${var.preview_base}"
}

output "custom_hostname_cname_target" {
  description = "What an org's custom preview base (e.g. *.previews.acme.com) must CNAME to."
  value       = var.enable_custom_hostnames ? cloudflare_custom_hostname_fallback_origin.saas[0].origin : null
}
