output "cluster_name" {
  value = google_container_cluster.olab.name
}

output "location" {
  description = "Zone of a zonal cluster, region of a regional one."
  value       = google_container_cluster.olab.location
}

output "endpoint" {
  description = "The control plane's address."
  value       = google_container_cluster.olab.endpoint
}

output "ca_certificate" {
  # The cluster's public CA (base64): needed to trust the endpoint, not a secret.
  description = "The cluster CA certificate, base64 encoded."
  value       = google_container_cluster.olab.master_auth[0].cluster_ca_certificate
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
  value = google_container_node_pool.core.name
}

output "user_pool" {
  value = google_container_node_pool.user.name
}

output "workload_pool" {
  value = google_container_cluster.olab.workload_identity_config[0].workload_pool
}
