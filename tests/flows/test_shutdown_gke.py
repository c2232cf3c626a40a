"""The weekend shutdown of a gke site in scale-to-zero mode, end to end on the fakes: user
servers stopped through the hub's API, both pools to 0 nodes through the real
google-cloud-container client (a fake GKE API that keeps state), the restore point in the
state bucket (fake-gcs-server) before anything is scaled down, and back on Monday."""

from __future__ import annotations

import json

import pytest
import yaml

from core.planning import Refused
from flows.restore import restore
from flows.teardown import teardown
from tests.fakes.gke import FakeGke, SeedPool
from tests.flows.test_deploy_gke import bao, gcs, image, lab  # noqa: F401 - fixtures
from tests.tasks.test_helm import z2jh_repo  # noqa: F401 - a fixture lab needs
from tests.flows.test_lifecycle import latest_artifact

pytestmark = pytest.mark.slow  # runs flows on a Prefect server (and the skips of test_deploy_gke's fakes)

USERS = ["ann", "bob"]


@pytest.fixture
def cluster(lab):  # noqa: F811
    with FakeGke(project="olab-test-project", location="europe-west2-a", operation_polls=2) as gke:
        gke.seed_cluster("olab", [SeedPool("core", nodes=1), SeedPool("user", nodes=2, min_nodes=0, max_nodes=3)])
        data = yaml.safe_load(lab.path.read_text())
        data["gke"]["apis"]["container"] = gke.url
        data["gke"]["poll_seconds"] = 0.1
        lab.path.write_text(yaml.safe_dump(data))
        lab.kube.add_claim("olab", "hub-db-dir", size="1Gi", reclaim_policy="Retain")
        for user in USERS:
            lab.kube.add_claim("olab", f"claim-{user}", size="10Gi", reclaim_policy="Retain",
                               annotations={"hub.jupyter.org/username": user})
            lab.hub.users[user] = {"servers": {"": {"name": "", "ready": True, "pending": None}}}
        yield gke


def bucket_objects(gcs, name: str) -> list[str]:  # noqa: F811
    return sorted(b.name for b in gcs.client().list_blobs("olab-tfstate", prefix=f"olab/{name}/"))


def test_scale_to_zero_and_back_keeps_every_claim_on_its_disk(lab, cluster, gcs):  # noqa: F811
    lab.deploy()
    upgrades = len(lab.upgrades())

    report = teardown(site=str(lab.path))
    assert sorted(report.users) == USERS and report.bytes == 2 * 10 * 2**30
    assert all(not u["servers"] for u in lab.hub.users.values()), "every user server was stopped through the hub"
    assert cluster.pool_size("olab", "user") == 0 and cluster.pool_size("olab", "core") == 0
    objects = bucket_objects(gcs, lab.name)
    point = report.restore_point
    assert f"olab/{lab.name}/restore-points/{point}/manifest.json" in objects
    assert f"olab/{lab.name}/restore-points/{point}/COMPLETE" in objects and f"olab/{lab.name}/teardown.json" in objects
    manifest = json.loads(gcs.client().bucket("olab-tfstate").blob(f"olab/{lab.name}/restore-points/{point}/manifest.json").download_as_text())
    assert manifest["mode"] == "scale-to-zero" and manifest["image_ref"]["digest"] == image().digest
    assert {c["claim"]: c["disk"]["name"] for c in manifest["claims"]}.keys() == {"hub-db-dir", "claim-ann", "claim-bob"}
    cost = latest_artifact(f"{lab.name}-teardown-cost").data
    assert "60 hours off a week" in cost and "node-hours" in cost and "cluster fee: still paid" in cost

    assert teardown(site=str(lab.path)).already_torn_down
    refused = lab.deploy(image())
    assert isinstance(refused, Refused) and "is torn down" in str(refused), "deploy refuses while the site is torn down"

    back = restore(site=str(lab.path))
    assert back.restore_point == point and sorted(u.user for u in back.users) == USERS and all(u.verified for u in back.users)
    assert cluster.pool_size("olab", "core") == 1 and cluster.pool_size("olab", "user") == 0, "the sizes the site asks for"
    assert back.hub.action == "unchanged" and len(lab.upgrades()) == upgrades, "the same release: no helm upgrade"
    assert f"olab/{lab.name}/teardown.json" not in bucket_objects(gcs, lab.name)


def test_a_claim_on_another_disk_after_the_weekend_stops_the_restore(lab, cluster):  # noqa: F811
    lab.deploy()
    teardown(site=str(lab.path))
    # Over the weekend someone re-created bob's claim on another disk.
    lab.kube.add_claim("olab", "claim-bob", size="10Gi", disk="someone-elses-disk", annotations={"hub.jupyter.org/username": "bob"})
    with pytest.raises(RuntimeError, match="claim claim-bob is not bound to the disk"):
        restore(site=str(lab.path))
