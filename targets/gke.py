"""The gke target: Google Kubernetes Engine, provisioned by Terraform.

Built: provision-cluster (terraform plan -> approval when destructive -> apply ->
the cluster and its pools ready through GKE's API -> a kubeconfig); build-image /
test-notebooks with the image in the site's Artifact Registry; deploy-hub (Helm,
Zero-to-JupyterHub, secrets from Vault); the weekend shutdown in both modes
(targets/gke_shutdown.py).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from core.config import GkeSettings, Site
from core.files import sha256_bytes
from core.hub_values import (
    HUB_RELEASE,
    INGRESS_RELEASE,
    chart_source,
    ingress_values,
    merge_values,
    secrets_layer,
    validate_values,
    values_diff,
    z2jh_values,
)
from core.logs import task_logger
from core.models import (
    Check,
    DataFacts,
    HubAccess,
    HubDeployment,
    HubPlan,
    HubSpec,
    HubState,
    ImageRef,
    InfraPlan,
    PlannedStep,
    ProvisionReport,
    RegistryAccess,
    RegistryLogin,
    RestorePointSummary,
    UserRestore,
)
from core.planning import ReleaseFacts, hours_off, plan_release, release_hash, shutdown_savings
from core.restore_points import RestorePoint, TeardownMark, plan_prune
from core.platform import TargetNotReady
from core.secrets import HubSecrets
from core.state import load_state, update_state
from tasks.gcs import RestorePointStore
from tasks.terraform import PlanSummary, Terraform
from targets.gke_shutdown import GkeShutdown

# stop-hub is not among them: on GKE the hub stops with its pool, in the weekend shutdown.
READY = frozenset({"provision-cluster", "build-image", "test-notebooks", "deploy-hub", "release", "teardown", "restore"})
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
        # The weekend shutdown's destroy mode plans with false (targets/gke_shutdown.py).
        "cluster": True,
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


class GkePlatform(GkeShutdown):
    def __init__(self, site: Site):
        if site.config.gke is None:
            raise TargetNotReady(f"site {site.name}: target gke needs a gke section")
        self.site = site
        self.gke: GkeSettings = site.config.gke
        self._terraform: Terraform | None = None
        self._plan: PlanSummary | None = None
        self._hub_secrets: HubSecrets | None = None
        self._release_plan: ReleaseFacts | None = None
        self._points: RestorePointStore | None = None
        self._kubeconfig_fresh = False

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
        update_state(self.site, infra=public)
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

    def image_pushed(self, repository: str, digest: str) -> None:
        """Artifact Registry keeps who pushed what (audit logs); nothing is recorded here."""

    def image_known(self, repository: str, digest: str) -> bool:
        """Artifact Registry is written only with the project's IAM (CI's or an operator's
        Google identity), so a tag's digest there is the project's own build."""
        return True

    # The hub: Zero-to-JupyterHub by helm, secrets from Vault, HTTPS through our ingress chart.
    def _kubeconfig(self) -> Path:
        """provision-cluster's kubeconfig, with a fresh token (Google's last about an hour, and
        Monday's restore comes long after Friday's provision)."""
        from tasks.gke import access_token, refresh_kubeconfig_token

        path = self.site.paths.runtime / "kubeconfig"
        if not path.is_file():
            raise TargetNotReady(f"site {self.site.name}: no kubeconfig at {path}: run provision-cluster first")
        if not self._kubeconfig_fresh and (token := access_token(self.gke.apis)):
            refresh_kubeconfig_token(path, token)
        self._kubeconfig_fresh = True
        return path

    def _secrets(self) -> HubSecrets:
        if self._hub_secrets is None:
            from tasks.vault import read_hub_secrets, vault_access

            if self.site.config.vault is None:
                raise TargetNotReady(f"site {self.site.name}: deploy-hub on gke needs a vault section (where the hub's secrets are)")
            self._hub_secrets = read_hub_secrets(vault_access(self.site.config.vault))
        return self._hub_secrets

    def _revisions(self, release: str) -> list:
        """Every stored revision of ``release`` (tasks.kubernetes.HelmRevision), oldest first."""
        from tasks.kubernetes import api_from_kubeconfig, helm_releases

        with api_from_kubeconfig(self._kubeconfig()) as api:
            return helm_releases(api, self.gke.namespace, release)

    @staticmethod
    def _facts_of(revisions: list) -> ReleaseFacts:
        from tasks.kubernetes import stuck_release

        deployed = max((r for r in revisions if r.status == "deployed"), key=lambda r: r.revision, default=None)
        stuck = stuck_release(revisions)
        olab = ((deployed.values.get("custom") or {}).get("olab") or {}) if deployed else {}
        return ReleaseFacts(
            deployed_revision=deployed.revision if deployed else None,
            deployed_hash=olab.get("releaseHash"),
            stuck_revision=stuck.revision if stuck else None,
            stuck_status=stuck.status if stuck else None,
        )

    def _release_facts(self, release: str = HUB_RELEASE) -> ReleaseFacts:
        return self._facts_of(self._revisions(release))

    def _chart_schema(self) -> tuple[dict, dict]:
        """The pinned chart's own schema and defaults (pulled once per version)."""
        from tasks.helm import chart_schema_and_defaults, find_helm, pull_chart

        chart, repo, version = chart_source(self.site)
        folder = self.site.paths.runtime / "charts" / f"{chart}-{version}"
        if not (folder / chart / "values.schema.json").is_file():
            pull_chart(chart, repo, version, folder, helm=find_helm(self.gke.helm))
        return chart_schema_and_defaults(folder / chart)

    @staticmethod
    def _notebooks(spec: HubSpec) -> dict[str, str]:
        """The labs each student gets, as the notebooks they open, and the lab index they land
        on (they travel in the release)."""
        from core.lab_index import INDEX_NAME, index_notebook
        from tasks.notebooks import notebook_text

        notebooks = {f"{lab.name}.ipynb": notebook_text(lab) for lab in spec.labs}
        return {**notebooks, f"{INDEX_NAME}.ipynb": index_notebook(spec.labs)} if notebooks else {}

    def _layers(self, spec: HubSpec) -> tuple[dict, dict, dict, str]:
        """(site layer carrying its release hash, secrets layer, ingress layer, release hash), checked
        against the charts' schemas: a typo stops here, before helm or the cluster is touched.

        The release hash covers both releases olab deploys (the hub's and the ingress's: its
        values and its chart's files), so that a change to either is an upgrade."""
        from core.files import content_hash
        from core.hub_values import schema_problems
        from tasks.helm import ValuesRejected, base_values_file, chart_schema_and_defaults, ingress_chart, load_layers

        base = load_layers([base_values_file(self.site.project)])[0]
        site_layer = z2jh_values(self.site, spec, base=base, notebooks=self._notebooks(spec))
        ingress_layer = ingress_values(self.site, static_ip_name=self._static_ip_name())
        chart_dir = ingress_chart(self.site.project)
        ingress_files = sorted(p for p in chart_dir.rglob("*") if p.is_file())
        ingress_digest = content_hash((p.relative_to(chart_dir).as_posix(), p.read_bytes()) for p in ingress_files)
        secrets = self._secrets()
        plain = {name: getattr(secrets, name).get_secret_value() for name in type(secrets).model_fields}
        extra = secrets.extras()
        client_ids = [extra["lti_client_id"]] if extra.get("lti_client_id") else None
        secret_layer = secrets_layer(spec, plain, lti_client_ids=client_ids)
        chart, _, version = chart_source(self.site)
        digest = sha256_bytes(json.dumps(secret_layer, sort_keys=True).encode())
        ingress = {INGRESS_RELEASE: {"chart": ingress_digest, "values": ingress_layer}}
        release = release_hash(chart, version, [base, site_layer, ingress], digest, spec.image.digest)
        # Kept with the release (its values), so the next deploy can tell "nothing to do".
        site_layer.setdefault("custom", {})["olab"] = {"releaseHash": release, "site": self.site.name}
        problems = validate_values(merge_values(base, site_layer, secret_layer), *self._chart_schema())
        problems += [f"{INGRESS_RELEASE}: {p}" for p in schema_problems(ingress_layer, *chart_schema_and_defaults(chart_dir))]
        if problems:
            raise ValuesRejected(problems)
        return site_layer, secret_layer, ingress_layer, release

    def _ingress_behind(self, ingress_layer: dict) -> str | None:
        """Why the ingress release is not what this deploy would make it (None: it is): a
        deploy that failed after the hub's release was upgraded leaves it so."""
        revisions = self._revisions(INGRESS_RELEASE)
        facts = self._facts_of(revisions)
        if facts.stuck_revision is not None:
            return f"release {INGRESS_RELEASE}: revision {facts.stuck_revision} is stuck in {facts.stuck_status}"
        if facts.deployed_revision is None:
            return f"release {INGRESS_RELEASE} is not deployed"
        deployed = next(r for r in revisions if r.revision == facts.deployed_revision)
        if deployed.values != json.loads(json.dumps(ingress_layer)):
            return f"release {INGRESS_RELEASE}: revision {deployed.revision} has other values"
        return None

    def plan_hub(self, spec: HubSpec) -> HubPlan:
        from tasks.helm import base_values_file, load_layers

        site_layer, secret_layer, ingress_layer, release = self._layers(spec)
        revisions = self._revisions(HUB_RELEASE)
        facts = self._facts_of(revisions)
        action, reason = plan_release(release, facts)
        self._release_plan = facts
        if action == "unchanged" and (behind := self._ingress_behind(ingress_layer)):
            action, reason = "restart", f"{behind}: upgrade it (release {HUB_RELEASE}: {reason})"
        changes: list[str] = []
        if action != "unchanged" and facts.deployed_revision is not None:  # an upgrade: what differs from what runs
            deployed = next((r.values for r in revisions if r.revision == facts.deployed_revision), {})
            base = load_layers([base_values_file(self.site.project)])[0]
            changes = values_diff(deployed, merge_values(base, site_layer, secret_layer), secret_layer)
        return HubPlan(action=action, config_hash=release, url=self.gke.url, reason=reason, changes=changes)

    def _unstick(self, helm, release: str, facts: ReleaseFacts) -> None:
        """Undo a revision left pending (a deploy that was killed): helm refuses to upgrade
        ("another operation is in progress") until it is rolled back, or removed if nothing was
        ever deployed."""
        from tasks.helm import rollback_argv, run_helm, uninstall_argv

        if facts.stuck_revision is None:
            return
        namespace, timeout, kubeconfig = self.gke.namespace, self.gke.helm_timeout_seconds, self._kubeconfig()
        task_logger().warning("release %s: revision %d is stuck in %s (a deploy that was killed); %s", release,
                              facts.stuck_revision, facts.stuck_status,
                              f"rolling back to revision {facts.deployed_revision}" if facts.deployed_revision else "removing it")
        if facts.deployed_revision:
            argv = rollback_argv(helm, release, facts.deployed_revision, namespace=namespace, timeout_seconds=timeout, kubeconfig=kubeconfig)
        else:
            argv = uninstall_argv(helm, release, namespace=namespace, timeout_seconds=timeout, kubeconfig=kubeconfig)
        run_helm(helm, argv, "rollback" if facts.deployed_revision else "uninstall", timeout=timeout + 60)

    def apply_hub(self, spec: HubSpec, plan: HubPlan) -> HubDeployment:
        from tasks.helm import base_values_file, checked_upgrade_argv, find_helm, ingress_chart, run_helm, write_values
        from tasks.vault import helm_secret_values

        started = datetime.now(UTC)
        if plan.action == "unchanged":
            return HubDeployment(url=plan.url, config_hash=plan.config_hash, image=spec.image, started_at=started, action="unchanged")
        logger = task_logger()
        helm = find_helm(self.gke.helm)
        kubeconfig = self._kubeconfig()
        namespace, timeout = self.gke.namespace, self.gke.helm_timeout_seconds
        site_layer, secret_layer, ingress_layer, release = self._layers(spec)
        if release != plan.config_hash:
            raise RuntimeError("the hub's values changed between its plan and its apply; run deploy again")
        facts = self._release_plan or self._release_facts()
        work = self.site.paths.runtime / "helm"
        if facts.stuck_revision is None and facts.deployed_hash == release:
            # Only the ingress release is behind (plan_hub said why): the hub's stays as it is.
            logger.info("release %s: revision %d already is %s; not upgraded", HUB_RELEASE, facts.deployed_revision, release[:12])
        else:
            self._unstick(helm, HUB_RELEASE, facts)
            site_file = write_values(work / "site.yaml", site_layer)
            chart, repo, version = chart_source(self.site)
            schema, defaults = self._chart_schema()
            with helm_secret_values(secret_layer) as secrets_file:
                argv = checked_upgrade_argv(
                    helm, HUB_RELEASE, chart, repo=repo, version=version,
                    values_files=[base_values_file(self.site.project), site_file, secrets_file],
                    schema=schema, defaults=defaults, namespace=namespace, timeout_seconds=timeout, kubeconfig=kubeconfig,
                )
                try:
                    run_helm(helm, argv, "upgrade --install", timeout=timeout + 60)
                except Exception as exc:
                    raise RuntimeError(f"{exc}{self._failure_report()}") from None
        self._unstick(helm, INGRESS_RELEASE, self._release_facts(INGRESS_RELEASE))
        chart_dir = ingress_chart(self.site.project)
        ingress_file = write_values(work / "ingress.yaml", ingress_layer)
        argv = checked_upgrade_argv(
            helm, INGRESS_RELEASE, chart_dir, repo=None, version=None, values_files=[ingress_file],
            schema=json.loads((chart_dir / "values.schema.json").read_text()), defaults={}, hub_rules=False,
            namespace=namespace, timeout_seconds=timeout, kubeconfig=kubeconfig,
        )
        try:
            run_helm(helm, argv, "upgrade --install (ingress)", timeout=timeout + 60)
        except Exception as exc:
            raise RuntimeError(f"{exc}{self._failure_report()}") from None
        return HubDeployment(url=plan.url, config_hash=release, image=spec.image, started_at=started, action=plan.action)

    def _static_ip_name(self) -> str:
        return load_state(self.site).infra.get("static_ip_name") or f"{self.gke.cluster_name}-hub"

    def _failure_report(self) -> str:
        """What the failing pods said (why helm's --wait gave up), for the error."""
        try:
            from tasks.kubernetes import api_from_kubeconfig, failing_pods, pod_events

            lines = []
            with api_from_kubeconfig(self._kubeconfig()) as api:
                for problem in failing_pods(api, self.gke.namespace)[:5]:
                    lines.append(f"pod {problem.pod}: {problem.phase} {problem.reason} {problem.message}".rstrip())
                    lines += [f"  {event}" for event in pod_events(api, self.gke.namespace, problem.pod)[-3:]]
            return ("; failing pods:\n" + "\n".join(lines)) if lines else ""
        except Exception as exc:  # the report must not hide helm's own error
            return f"; (the pods could not be read: {exc})"

    def hub_state(self) -> HubState:
        from tasks.hub_api import hub_version

        if self._cluster_gone():
            return self.cluster_gone_state()
        facts = self._release_facts()
        recorded = load_state(self.site).hub
        running = facts.deployed_revision is not None
        return HubState(
            running=running, url=self.gke.url, version=hub_version(self.gke.url) if running else None,
            image=recorded.image if recorded else None, config_hash=facts.deployed_hash,
            detail=f"release {HUB_RELEASE} revision {facts.deployed_revision}" if running else "no deployed release",
        )

    def spawn_report(self, user: str) -> list[str]:
        """The user's pod (KubeSpawner names it jupyter-<escaped name>): its problem and events."""
        from tasks.kubernetes import api_from_kubeconfig, pod_report

        safe = "abcdefghijklmnopqrstuvwxyz0123456789"
        pod = "jupyter-" + "".join(c if c in safe else "".join(f"-{b:02x}" for b in c.encode()) for c in user.lower())
        try:
            with api_from_kubeconfig(self._kubeconfig()) as api:
                return pod_report(api, self.gke.namespace, pod)
        except Exception as exc:  # the report must not hide the health check's own error
            return [f"(the pod {pod} could not be read: {exc})"]

    def hub_access(self) -> HubAccess:
        return HubAccess(url=self.gke.url, token=self._secrets().api_token)
