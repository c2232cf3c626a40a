output "cluster_name" {
  value = var.cluster_name
}

output "location" {
  description = "Zone of a zonal cluster, region of a regional one."
  value       = local.location
}

output "endpoint" {
  description = "The control plane's address (null while the cluster is absent)."
  value       = one(google_container_cluster.olab[*].endpoint)
}

output "ca_certificate" {
  # The cluster's public CA (base64): needed to trust the endpoint, not a secret.
  description = "The cluster CA certificate, base64 encoded."
  value       = try(google_container_cluster.olab[0].master_auth[0].cluster_ca_certificate, null)
}

output "static_ip" {
  description = "The hub's global address: point the site's domains at it."
  value       = google_compute_global_address.hub.address
}

output "static_ip_name" {
  description = "Name for the ingress annotation kubernetes.io/ingress.global-static-ip-name."
  value       = google_compute_global_address.hub.name
}

output "registry" {
  description = "Where user images are pushed: <region>-docker.pkg.dev/<project>/<repository>."
  value       = "${google_artifact_registry_repository.images.location}-docker.pkg.dev/${var.project}/${google_artifact_registry_repository.images.repository_id}"
}

output "core_pool" {
  value = "core"
}

output "user_pool" {
  value = "user"
}

output "workload_pool" {
  value = "${var.project}.svc.id.goog"
}
