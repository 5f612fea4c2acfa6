variable "name" {
  description = "Name prefix of every resource, e.g. wakegate."
  type        = string
  default     = "wakegate"
}

variable "location" {
  description = "Hetzner location of the control plane, e.g. fsn1 (the previews' default location should match)."
  type        = string
  default     = "fsn1"
}

variable "datacenter" {
  description = "Datacenter of the control plane's primary IP, in var.location (fsn1-dc14, nbg1-dc3, hel1-dc2, ...)."
  type        = string
  default     = "fsn1-dc14"
}

variable "server_type" {
  description = "Server type of the control plane (waker, provisioner, Redis), e.g. cx22."
  type        = string
  default     = "cx22"
}

variable "image" {
  description = "Image of the control plane server."
  type        = string
  default     = "ubuntu-24.04"
}

variable "ssh_key_ids" {
  description = "SSH keys for the control plane's admin access (previews never get any)."
  type        = list(string)
  default     = []
}

variable "admin_ips" {
  description = "CIDRs allowed to SSH into the control plane; empty: no SSH at all."
  type        = list(string)
  default     = []
}

variable "wakegate_url" {
  description = "Where cloud-init downloads the wakegate binary from (a release asset, x86_64 Linux)."
  type        = string
}

variable "wakegate_sha256" {
  description = "SHA-256 of that binary; cloud-init refuses anything else."
  type        = string
}

variable "preview_base" {
  description = "The preview base, e.g. preview.example.com (as in terraform/cloudflare)."
  type        = string
}

variable "waker_hostname" {
  description = "Public name of waker's API (behind Cloudflare), which the edge Worker calls, e.g. waker.example.com."
  type        = string
}

variable "control_hostname" {
  description = "Public name agents on preview servers call, e.g. control.example.com (points at this server)."
  type        = string
}

variable "edge_ranges" {
  description = "Where edge traffic comes from: Cloudflare's published ranges (https://www.cloudflare.com/ips/)."
  type        = list(string)
  default = [
    "173.245.48.0/20", "103.21.244.0/22", "103.22.200.0/22", "103.31.4.0/22", "141.101.64.0/18",
    "108.162.192.0/18", "190.93.240.0/20", "188.114.96.0/20", "197.234.240.0/22", "198.41.128.0/17",
    "162.158.0.0/15", "104.16.0.0/13", "104.24.0.0/14", "172.64.0.0/13", "131.0.72.0/22",
    "2400:cb00::/32", "2606:4700::/32", "2803:f800::/32", "2405:b500::/32", "2405:8100::/32",
    "2a06:98c0::/29", "2c0f:f248::/32",
  ]
}

variable "pools" {
  description = "WAKEGATE_POOLS: comma-separated <server type>@<location>:<min ready>:<max>:<max age secs>; empty: no pools."
  type        = string
  default     = "cx22@fsn1:2:6:86400"
}

variable "hcloud_token" {
  description = "Hetzner Cloud API token the provisioner uses to make preview servers."
  type        = string
  sensitive   = true
}

variable "edge_key" {
  description = "Shared secret signing edge → waker calls (the Worker's EDGE_KEY); at least 16 characters."
  type        = string
  sensitive   = true
}

variable "machine_key" {
  description = "Secret from which each preview machine's agent token is derived; at least 16 characters."
  type        = string
  sensitive   = true
}

variable "operator_token" {
  description = "Bearer token of waker's operator API (CI creates previews with it)."
  type        = string
  sensitive   = true
}
