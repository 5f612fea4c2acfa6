terraform {
  required_version = ">= 1.5"
  required_providers {
    cloudflare = {
      source  = "cloudflare/cloudflare"
      version = "~> 5.0"
    }
  }
}

provider "cloudflare" {
  # the token comes from CLOUDFLARE_API_TOKEN; it needs Zone DNS edit, Workers Routes
  # edit and SSL and Certificates edit (custom hostnames) on the zone
}
