locals {
  labels = {
    "managed-by" = "wakegate-terraform"
    "role"       = "control-plane"
  }
  # ports on the control plane: waker's API (behind Cloudflare, TLS terminated by
  # Caddy) and the agent endpoint preview servers call
  waker_port = 443
  agent_port = 8443
}

resource "hcloud_network" "control" {
  name     = "${var.name}-control"
  ip_range = "10.42.0.0/16"
  labels   = local.labels
}

resource "hcloud_network_subnet" "control" {
  network_id   = hcloud_network.control.id
  type         = "cloud"
  network_zone = "eu-central"
  ip_range     = "10.42.1.0/24"
}

# Nothing reaches the control plane but: waker's API from the edge, agents on the
# agent port (every call carries a per-machine token), SSH from the admin ranges.
resource "hcloud_firewall" "control" {
  name   = "${var.name}-control"
  labels = local.labels

  rule {
    description = "waker API from the edge (Cloudflare)"
    direction   = "in"
    protocol    = "tcp"
    port        = tostring(local.waker_port)
    source_ips  = var.edge_ranges
  }

  rule {
    description = "agents on preview servers pull work and report readiness"
    direction   = "in"
    protocol    = "tcp"
    port        = tostring(local.agent_port)
    source_ips  = ["0.0.0.0/0", "::/0"]
  }

  dynamic "rule" {
    for_each = length(var.admin_ips) > 0 ? [1] : []
    content {
      description = "SSH from the admin ranges"
      direction   = "in"
      protocol    = "tcp"
      port        = "22"
      source_ips  = var.admin_ips
    }
  }
}

# spread: a second control-plane server (a standby provisioner replica) never shares
# a physical host with the first
resource "hcloud_placement_group" "control" {
  name   = "${var.name}-control"
  type   = "spread"
  labels = local.labels
}

resource "hcloud_primary_ip" "control" {
  name          = "${var.name}-control-v4"
  type          = "ipv4"
  assignee_type = "server"
  auto_delete   = false
  datacenter    = var.datacenter
  labels        = local.labels
}

resource "hcloud_server" "control" {
  name               = "${var.name}-control"
  server_type        = var.server_type
  image              = var.image
  location           = var.location
  ssh_keys           = var.ssh_key_ids
  firewall_ids       = [hcloud_firewall.control.id]
  placement_group_id = hcloud_placement_group.control.id
  labels             = local.labels

  public_net {
    ipv4_enabled = true
    ipv4         = hcloud_primary_ip.control.id
    ipv6_enabled = true
  }

  network {
    network_id = hcloud_network.control.id
    ip         = "10.42.1.10"
  }

  user_data = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    wakegate_url     = var.wakegate_url
    wakegate_sha256  = var.wakegate_sha256
    preview_base     = var.preview_base
    waker_hostname   = var.waker_hostname
    control_hostname = var.control_hostname
    agent_port       = local.agent_port
    control_ip       = hcloud_primary_ip.control.ip_address
    pools            = var.pools
    location         = var.location
    hcloud_token     = var.hcloud_token
    edge_key         = var.edge_key
    machine_key      = var.machine_key
    operator_token   = var.operator_token
  })

  depends_on = [hcloud_network_subnet.control]

  lifecycle {
    # a new binary or secret is rolled out by replacing the server; Redis keeps its
    # data on the volume
    ignore_changes = [ssh_keys]
  }
}

resource "hcloud_volume" "redis" {
  name      = "${var.name}-redis"
  size      = 10
  server_id = hcloud_server.control.id
  automount = true
  format    = "ext4"
  labels    = local.labels
}
