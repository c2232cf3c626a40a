"""provision-cluster against a real Google Cloud project: only when one is given.

OLAB_GCP_PROJECT (a project you may create clusters in), OLAB_GCP_STATE_BUCKET (an existing
state bucket: terraform/bootstrap makes one) and Google application default credentials
(GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth application-default login`) select it.
The plan alone costs nothing; OLAB_GCP_LIVE_APPLY=1 also creates the cluster, waits for it,
writes the kubeconfig and destroys it all again (about 15 minutes, a few cents).
"""

from __future__ import annotations

import os

import pytest
import yaml

from core.config import load_site
from core.models import FlowPlan
from flows.provision_cluster import provision_cluster
from tests.conftest import REPO

PROJECT = os.environ.get("OLAB_GCP_PROJECT")
BUCKET = os.environ.get("OLAB_GCP_STATE_BUCKET")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (PROJECT and BUCKET), reason="live GKE test: set OLAB_GCP_PROJECT and OLAB_GCP_STATE_BUCKET (and Google credentials) to run it"),
]


@pytest.fixture
def live_site(tmp_path):
    region = os.environ.get("OLAB_GCP_REGION", "europe-west2")
    site = {
        "name": "olab-live-test", "target": "gke", "runtime_dir": str(tmp_path / "runtime"),
        "gke": {
            "project": PROJECT, "region": region, "zone": f"{region}-a", "cluster_name": "olab-live-test",
            "domains": ["olab-live-test.invalid"], "registry": f"{region}-docker.pkg.dev/{PROJECT}/olab-live-test",
            "registry_repository": "olab-live-test", "terraform_state_bucket": BUCKET,
            "terraform_state_prefix": "olab/live-test", "terraform_module": str(REPO / "terraform" / "gke"),
        },
    }
    path = tmp_path / "olab-live-test.yaml"
    path.write_text(yaml.safe_dump(site))
    return path


def test_a_real_project_plans_and_optionally_applies_and_destroys(live_site):
    plan = provision_cluster(site=str(live_site), dry_run=True)
    assert isinstance(plan, FlowPlan) and any("google_container_node_pool.user" in s.subject for s in plan.steps)
    if os.environ.get("OLAB_GCP_LIVE_APPLY") != "1":
        return
    from targets.gke import GkePlatform

    site = load_site(str(live_site))
    try:
        report = provision_cluster(site=str(live_site), approve=True)
        assert all(c.ok for c in report.checks) and report.kubeconfig
    finally:
        tf = GkePlatform(site).terraform()
        tf.init()
        tf.apply(tf.plan(destroy=True))
