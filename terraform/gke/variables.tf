variable "project" {
  description = "Google Cloud project id that holds every resource of the site."
  type        = string
}

variable "region" {
  description = "Region of the registry, and of the cluster when zone is null."
  type        = string
}

variable "zone" {
  description = "Zone of a zonal cluster; null makes a regional cluster in region."
  type        = string
  # olab renders the site's zone and its example site is zonal: GKE's free
  # management credit covers one zonal cluster, a regional one puts every pool's
  # nodes in three zones, and a course lab can live with a zone's outage.
  default = null

  validation {
    # can() because || does not short-circuit: regex(null) would be an error.
    condition     = var.zone == null || can(regex("^[a-z]+-[a-z]+[0-9]+-[a-z]$", var.zone))
    error_message = "zone must be a zone name such as europe-west2-a, or null for a regional cluster."
  }
}

variable "cluster_name" {
  description = "Name of the GKE cluster."
  type        = string
}

variable "release_channel" {
  description = "GKE release channel: RAPID, REGULAR or STABLE."
  type        = string

  validation {
    condition     = contains(["RAPID", "REGULAR", "STABLE"], var.release_channel)
    error_message = "release_channel must be RAPID, REGULAR or STABLE."
  }
}

variable "core_pool" {
  description = "Nodes for the hub, the proxy and the user scheduler. Counts are per zone of the cluster's location."
  type = object({
    machine_type = string
    min_nodes    = number
    max_nodes    = number
    preemptible  = bool
  })

  validation {
    condition     = var.core_pool.min_nodes >= 0 && var.core_pool.min_nodes <= var.core_pool.max_nodes && var.core_pool.max_nodes >= 1
    error_message = "core_pool needs 0 <= min_nodes <= max_nodes and max_nodes >= 1."
  }
}

variable "user_pool" {
  description = "Nodes for the students' servers. Counts are per zone of the cluster's location."
  type = object({
    machine_type = string
    min_nodes    = number
    max_nodes    = number
    preemptible  = bool
  })

  validation {
    condition     = var.user_pool.min_nodes >= 0 && var.user_pool.min_nodes <= var.user_pool.max_nodes && var.user_pool.max_nodes >= 1
    error_message = "user_pool needs 0 <= min_nodes <= max_nodes and max_nodes >= 1."
  }
}

variable "registry_repository" {
  description = "Artifact Registry repository id (Docker format) that user images are pushed to."
  type        = string
}

variable "static_ip_name" {
  description = "Name of the global static IP address the hub's ingress is given."
  type        = string
}

variable "labels" {
  description = "Labels put on every resource that takes them (cost attribution)."
  type        = map(string)
  default     = {}
}

variable "cluster" {
  description = "Whether the cluster and its node pools exist: false removes them (the weekend shutdown's destroy mode) and keeps the registry and the hub's address."
  type        = bool
  default     = true
}
