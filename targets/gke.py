"""The gke target: Google Kubernetes Engine, provisioned by Terraform.

Built so far: provision-cluster (terraform plan -> approval when destructive ->
apply -> the cluster and its pools ready through GKE's API -> a kubeconfig), and
build-image / test-notebooks with the image in the site's Artifact Registry.
Every other lifecycle step refuses with one line until deploy-hub and the
weekend shutdown on GKE fill it in.
"""

from __future__ import annotations

from core.config import GkeSettings, Site
from core.models import Check, InfraPlan, PlannedStep, ProvisionReport, RegistryAccess, RegistryLogin
from core.platform import TargetNotReady
from tasks.terraform import PlanSummary, Terraform

READY = frozenset({"provision-cluster", "build-image", "test-notebooks"})
VERBS = {"add": "create", "change": "update", "replace": "replace", "destroy": "delete"}
# The outputs later flows use; none of them is a secret.
PUBLIC_OUTPUTS = ("cluster_name", "location", "endpoint", "static_ip", "static_ip_name", "registry", "core_pool", "user_pool")


def terraform_variables(site: Site) -> dict:
    """The module's variables, from the site file (pure)."""
    gke = site.config.gke
    assert gke is not None

    def pool(p) -> dict:
        return {"machine_type": p.machine_type, "min_nodes": p.min_nodes, "max_nodes": p.max_nodes, "preemptible": p.preemptible}

    return {
        "project": gke.project,
        "region": gke.region,
        "zone": gke.zone,
        "cluster_name": gke.cluster_name,
        "release_channel": gke.release_channel,
        "core_pool": pool(gke.core_pool),
        "user_pool": pool(gke.user_pool),
        "registry_repository": gke.registry_repository,
        "static_ip_name": f"{gke.cluster_name}-hub",
        "labels": {"olab-site": site.name},
    }


def backend_settings(site: Site) -> dict[str, str]:
    """Where the site's state lives: its own prefix in the state bucket (pure)."""
    gke = site.config.gke
    assert gke is not None
    backend = {"bucket": gke.terraform_state_bucket, "prefix": gke.terraform_state_prefix or f"olab/{site.name}"}
    if gke.apis.storage:
        backend["storage_custom_endpoint"] = gke.apis.storage.rstrip("/") + "/storage/v1/"
    return backend


def infra_plan(plan: PlanSummary) -> InfraPlan:
    steps = [PlannedStep(verb=VERBS[c.kind], subject=c.address, detail="+".join(c.actions)) for c in plan.changes if c.kind in VERBS]
    steps += [PlannedStep(verb="update", subject=f"output {name}") for name in plan.output_changes]
    return InfraPlan(
        target="gke", summary=plan.describe() if plan.has_changes else "no changes", steps=steps,
        changes=plan.has_changes, destructive=plan.destructive,
    )


class GkePlatform:
    def __init__(self, site: Site):
        if site.config.gke is None:
            raise TargetNotReady(f"site {site.name}: target gke needs a gke section")
        self.site = site
        self.gke: GkeSettings = site.config.gke
        self._terraform: Terraform | None = None
        self._plan: PlanSummary | None = None

    def not_ready(self, flow: str) -> str | None:
        if flow in READY:
            return None
        return (
            f"site {self.site.name}: target gke: {flow} is not built yet on GKE "
            f"(built: {', '.join(sorted(READY))})"
        )

    def _refuse(self, flow: str):
        raise TargetNotReady(self.not_ready(flow) or flow)

    # What the hub runs on: the cluster, its pools, the registry and the hub's address.
    def terraform(self) -> Terraform:
        if self._terraform is None:
            from tasks.gke import access_token

            token = access_token(self.gke.apis)
            self._terraform = Terraform(
                self.site.resolve(self.gke.terraform_module),
                self.site.paths.runtime / "terraform",
                tool=self.gke.terraform,
                variables=terraform_variables(self.site),
                backend=backend_settings(self.site),
                # The backend and the google provider read a token from here; never argv.
                env={"GOOGLE_OAUTH_ACCESS_TOKEN": token or "anonymous"},
                secrets=[token] if token else [],
            )
        return self._terraform

    def plan_provision(self) -> InfraPlan:
        tf = self.terraform()
        tf.init()
        self._plan = tf.plan()
        return infra_plan(self._plan)

    def provision(self, plan: InfraPlan) -> ProvisionReport:
        from tasks.gke import access_token, cluster_manager, wait_until_ready, write_kubeconfig

        tf = self.terraform()
        if self._plan is None:
            raise RuntimeError("provision needs the plan it was shown; plan first")
        checks: list[Check] = []
        if self._plan.has_changes:
            tf.apply(self._plan)
            checks.append(Check(name="terraform", ok=True, detail=f"applied: {self._plan.describe()}"))
        else:
            checks.append(Check(name="terraform", ok=True, detail="no changes; nothing applied"))
        outputs = tf.outputs()
        public = {k: str(outputs[k]) for k in PUBLIC_OUTPUTS if outputs.get(k) is not None}
        cluster = str(outputs.get("cluster_name") or self.gke.cluster_name)
        location = str(outputs.get("location") or self.gke.location)
        pools = [str(outputs[k]) for k in ("core_pool", "user_pool") if outputs.get(k)]
        info = wait_until_ready(
            cluster_manager(self.gke.apis), self.gke.project, location, cluster, pools,
            timeout=float(self.gke.cluster_ready_timeout_seconds), poll=float(self.gke.poll_seconds),
        )
        checks.append(Check(name="cluster", ok=True, detail=f"{cluster} {info.status} at {info.endpoint}"))
        for found in info.pools:
            checks.append(Check(name=f"pool {found.name}", ok=found.status == "RUNNING", detail=found.status))
        # Anonymous APIs (emulators on loopback) have no Google token to give Kubernetes either.
        token = access_token(self.gke.apis) or "anonymous"
        kubeconfig = write_kubeconfig(self.site.paths.runtime / "kubeconfig", info, token, namespace=self.gke.namespace)
        return ProvisionReport(site=self.site.name, target="gke", checks=checks, outputs=public, kubeconfig=str(kubeconfig))

    def image_registry(self, *, prepare: bool = True) -> RegistryAccess:
        """The site's Artifact Registry repository, logged in with a short-lived token
        of the site's Google credentials (as `gcloud auth configure-docker` would)."""
        from tasks.gke import access_token

        token = access_token(self.gke.apis)
        host = self.gke.registry.split("/")[0]
        return RegistryAccess(
            address=self.gke.registry,
            insecure=host.split(":")[0] in ("127.0.0.1", "localhost"),
            login=RegistryLogin(username="oauth2accesstoken", password=token) if token else None,
        )

    # Not built yet on GKE: deploy-hub and the weekend shutdown.

    def plan_hub(self, spec):
        self._refuse("deploy-hub")

    def apply_hub(self, spec, plan):
        self._refuse("deploy-hub")

    def hub_state(self):
        self._refuse("deploy-hub")

    def hub_access(self):
        self._refuse("deploy-hub")

    def stop_hub(self):
        self._refuse("stop-hub")

    def data_facts(self):
        self._refuse("teardown")

    def check_backup_room(self, needed_bytes):
        self._refuse("teardown")

    def save_user_data(self, point_id, users):
        self._refuse("teardown")

    def verify_user_data(self, point_id):
        self._refuse("teardown")

    def release_runtime(self):
        self._refuse("teardown")

    def restore_points(self):
        return []

    def prune_restore_points(self, protect):
        self._refuse("teardown")

    def bring_back_user_data(self, point_id):
        self._refuse("restore")

    def swap_in_restored(self):
        self._refuse("restore")

    def restore_point_image(self, point_id):
        self._refuse("restore")

    def read_mark(self):
        return None

    def write_mark(self, phase, point_id):
        self._refuse("teardown")

    def clear_mark(self):
        self._refuse("restore")
