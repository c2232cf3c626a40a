locals {
  location = coalesce(var.zone, var.region)
}

resource "google_container_cluster" "olab" {
  # Absent while the site is shut down in destroy mode (var.cluster = false).
  count    = var.cluster ? 1 : 0
  name     = var.cluster_name
  location = local.location

  # The node pools are resources of their own: a teardown can remove the nodes
  # (where the cost is) and keep the cluster and the users' disks, and a pool's
  # change never plans a replacement of the whole cluster. GKE cannot make a
  # cluster without a pool, so it gets a one-node default pool and drops it.
  remove_default_node_pool = true
  initial_node_count       = 1

  # olab's own guard is the plan approval: any plan that destroys or replaces
  # waits for an operator, and teardown must be able to destroy without a
  # second, out-of-band switch.
  deletion_protection = false

  release_channel {
    channel = var.release_channel
  }

  # Pods get Google credentials through Kubernetes service accounts rather
  # than the node's, which user code could otherwise read from the metadata server.
  workload_identity_config {
    workload_pool = "${var.project}.svc.id.goog"
  }

  resource_labels = var.labels
}

resource "google_container_node_pool" "core" {
  count    = var.cluster ? 1 : 0
  name     = "core"
  cluster  = google_container_cluster.olab[0].name
  location = google_container_cluster.olab[0].location

  # initial_node_count forces a new pool when it changes; the autoscaler owns
  # the size after creation, so a new min_nodes must not replace the pool.
  initial_node_count = var.core_pool.min_nodes

  autoscaling {
    min_node_count = var.core_pool.min_nodes
    max_node_count = var.core_pool.max_nodes
  }

  # A release channel requires auto-upgrade; auto-repair keeps the hub's node healthy.
  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.core_pool.machine_type
    preemptible     = var.core_pool.preemptible
    resource_labels = var.labels

    # Zero to JupyterHub's core pods prefer nodes with this label.
    labels = {
      "hub.jupyter.org/node-purpose" = "core"
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }

  lifecycle {
    ignore_changes = [initial_node_count]
  }
}

resource "google_container_node_pool" "user" {
  count    = var.cluster ? 1 : 0
  name     = "user"
  cluster  = google_container_cluster.olab[0].name
  location = google_container_cluster.olab[0].location

  # Same reason as the core pool: the autoscaler owns the size after creation.
  initial_node_count = var.user_pool.min_nodes

  # min_nodes 0 lets the pool scale to nothing when no student is working.
  autoscaling {
    min_node_count = var.user_pool.min_nodes
    max_node_count = var.user_pool.max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.user_pool.machine_type
    preemptible     = var.user_pool.preemptible
    resource_labels = var.labels

    # Zero to JupyterHub's user pods require this label and tolerate this
    # taint, so only user servers land here and they do not crowd the hub.
    labels = {
      "hub.jupyter.org/node-purpose" = "user"
    }

    taint {
      key    = "hub.jupyter.org_dedicated"
      value  = "user"
      effect = "NO_SCHEDULE"
    }

    # Students run arbitrary code: the GKE metadata server hides the node's
    # service account token from their pods.
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }

  lifecycle {
    ignore_changes = [initial_node_count]
  }
}

resource "google_artifact_registry_repository" "images" {
  repository_id = var.registry_repository
  location      = var.region
  format        = "DOCKER"
  description   = "O-Lab user images"
  labels        = var.labels
  # No cleanup policy: an older image may still be pinned by digest (a restore
  # point or a rollback), and deleting it would break bringing that back.
}

# The GKE ingress that serves the hub with a ManagedCertificate is a global
# external HTTPS load balancer, which only takes a global address. A reserved
# address, unlike the ephemeral one the ingress would get, stays the same when
# the ingress is recreated, so the DNS record and the certificate stay valid.
resource "google_compute_global_address" "hub" {
  name   = var.static_ip_name
  labels = var.labels
}

# The cluster and its pools became counted (var.cluster): state written before that
# keeps its resources, at index 0, rather than planning them destroyed and made anew.
moved {
  from = google_container_cluster.olab
  to   = google_container_cluster.olab[0]
}

moved {
  from = google_container_node_pool.core
  to   = google_container_node_pool.core[0]
}

moved {
  from = google_container_node_pool.user
  to   = google_container_node_pool.user[0]
}
