variable "zone_id" {
  description = "Cloudflare zone that holds the preview base, e.g. the zone of example.com."
  type        = string
}

variable "preview_base" {
  description = "The preview base: every preview answers at <label>.<preview_base>, e.g. preview.example.com. Must be inside the zone."
  type        = string
}

variable "worker_name" {
  description = "Name of the deployed edge Worker (the `name` in wrangler.toml)."
  type        = string
  default     = "wakegate-edge"
}

variable "saas_fallback_hostname" {
  description = "Fallback origin for Cloudflare for SaaS custom hostnames (orgs CNAME previews.acme.com to it), e.g. saas.example.com. Inside the zone."
  type        = string
}

variable "enable_custom_hostnames" {
  description = "Whether to set up Cloudflare for SaaS (custom org subdomains) on this zone."
  type        = bool
  default     = true
}
