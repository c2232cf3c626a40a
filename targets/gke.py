"""The gke target: Google Kubernetes Engine with Terraform, Helm (Zero-to-JupyterHub) and Vault.

Not built yet: every lifecycle step refuses with one line until provision-cluster,
deploy-hub and the weekend shutdown on GKE fill this platform in.
"""

from __future__ import annotations

from core.config import Site
from core.platform import TargetNotReady


class GkePlatform:
    def __init__(self, site: Site):
        raise TargetNotReady(
            f"site {site.name}: target gke: its lifecycle (Terraform, Helm/Zero-to-JupyterHub, Vault) is not "
            "built yet; olab runs local sites only for now"
        )
