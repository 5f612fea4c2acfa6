locals {
  # The Worker answers every request itself, so the DNS records only need to be
  # proxied: 100:: is the reserved discard address Cloudflare documents for
  # "originless" Worker routes.
  originless = "100::"
}

# *.preview.example.com → the Worker (one label per preview: one wildcard certificate)
resource "cloudflare_dns_record" "preview_wildcard" {
  zone_id = var.zone_id
  name    = "*.${var.preview_base}"
  type    = "AAAA"
  content = local.originless
  proxied = true
  ttl     = 1
  comment = "Wakegate previews (served by the ${var.worker_name} Worker)"
}

resource "cloudflare_workers_route" "previews" {
  zone_id = var.zone_id
  pattern = "*.${var.preview_base}/*"
  script  = var.worker_name
}

# Cloudflare for SaaS: custom org subdomains (previews.acme.com) CNAME to the fallback
# origin; the catch-all route sends their traffic to the same Worker, which routes by
# the normalized Host like any preview host.
resource "cloudflare_dns_record" "saas_fallback" {
  count   = var.enable_custom_hostnames ? 1 : 0
  zone_id = var.zone_id
  name    = var.saas_fallback_hostname
  type    = "AAAA"
  content = local.originless
  proxied = true
  ttl     = 1
  comment = "Wakegate: fallback origin for custom org hostnames"
}

resource "cloudflare_custom_hostname_fallback_origin" "saas" {
  count   = var.enable_custom_hostnames ? 1 : 0
  zone_id = var.zone_id
  origin  = cloudflare_dns_record.saas_fallback[0].name
}

resource "cloudflare_workers_route" "custom_hostnames" {
  count   = var.enable_custom_hostnames ? 1 : 0
  zone_id = var.zone_id
  pattern = "*/*"
  script  = var.worker_name
}
