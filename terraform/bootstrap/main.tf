# Run once per project, before any site: the gke module keeps its state in the
# bucket made here, so this module cannot keep its own state there. Its state
# stays local (no backend block); a lost state file costs nothing, since
# `terraform import google_storage_bucket.state <bucket_name>` brings it back.
terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region
}

resource "google_storage_bucket" "state" {
  name     = var.bucket_name
  location = var.region

  # Every state write is a new object generation: a corrupted or wrongly
  # applied state can be rolled back to an earlier one.
  versioning {
    enabled = true
  }

  # State holds the cluster's CA and other infrastructure details: access is
  # granted by IAM on the bucket only, never by object ACLs or to the public.
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  # The bucket holds the only record of what olab made; destroying it must
  # first be a deliberate emptying by hand.
  force_destroy = false
}
