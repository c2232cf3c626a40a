output "bucket" {
  description = "The state bucket's name, for gke.terraform_state_bucket in each site."
  value       = google_storage_bucket.state.name
}
