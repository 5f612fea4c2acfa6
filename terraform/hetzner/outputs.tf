output "control_ipv4" {
  description = "Point control_hostname and waker_hostname (proxied through Cloudflare) here."
  value       = hcloud_primary_ip.control.ip_address
}

output "control_ipv6" {
  description = "The control plane's IPv6 address."
  value       = hcloud_server.control.ipv6_address
}

output "private_ip" {
  description = "The control plane's address in the private network."
  value       = one(hcloud_server.control.network[*].ip)
}
