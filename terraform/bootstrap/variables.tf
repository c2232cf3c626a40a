variable "project" {
  description = "Google Cloud project id that holds the state bucket."
  type        = string
}

variable "region" {
  description = "Where the bucket lives; the sites' region keeps state near the cluster."
  type        = string
}

variable "bucket_name" {
  description = "Globally unique bucket name: the sites' gke.terraform_state_bucket."
  type        = string
}
