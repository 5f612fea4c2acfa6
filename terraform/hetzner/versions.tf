terraform {
  required_version = ">= 1.5"
  required_providers {
    hcloud = {
      source  = "hetznercloud/hcloud"
      version = "~> 1.49"
    }
  }
}

provider "hcloud" {
  # the token comes from HCLOUD_TOKEN (a read & write token of the Hetzner Cloud
  # project the previews run in)
}
