terraform {
  # 1.5 is the last MPL-licensed Terraform and OpenTofu forked from it: nothing
  # newer is needed, so either tool runs this module.
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
  }

  # Partial configuration: olab passes the site's bucket and prefix at init
  # (-backend-config=<file>), so one module serves every site without edits.
  backend "gcs" {}
}

provider "google" {
  project = var.project
  region  = var.region
}
