"""The weekend shutdown of a gke site in destroy mode, end to end on the fakes: user servers
stopped through the hub's API; a snapshot of every claim's disk through the real
google-cloud-compute client (a fake Compute API that keeps state: snapshots CREATING, then
UPLOADING, then READY over several polls); the manifest in the state bucket
(fake-gcs-server) before anything is deleted; the cluster and its pools removed by the real
terraform (the stand-in module's provisioners call the fake GKE API through the real
google-cloud-container client, and a deleted cluster takes its Kubernetes objects with it);
the disks deleted only with their READY snapshots. On Monday: the cluster made again while
the disks are made from the snapshots, each claim bound by its own name to its own disk,
the hub installed with the same image digest."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from core.planning import Refused
from flows.provision_cluster import provision_cluster
from flows.restore import restore
from flows.teardown import teardown
from tests.conftest import REPO
from tests.fakes.compute import FakeCompute
from tests.fakes.gke import FakeGke
from tests.flows.test_deploy_gke import NS, bao, gcs, image, lab  # noqa: F401 - fixtures
from tests.flows.test_deploy_gke import pytestmark as deploy_gke_marks
from tests.flows.test_lifecycle import latest_artifact
from tests.tasks.test_helm import z2jh_repo  # noqa: F401 - a fixture lab needs

pytestmark = [*deploy_gke_marks, pytest.mark.skipif(
    __import__("shutil").which("terraform") is None, reason="terraform is not installed (setup.sh installs it)")]

STANDIN = REPO / "tests" / "fixtures" / "gke-standin"
PROJECT, ZONE, CLUSTER, BUCKET = "olab-test-project", "europe-west2-a", "olab", "olab-tfstate"
USERS = ["ann", "bob"]


class World:
    def __init__(self, lab, gke: FakeGke, compute: FakeCompute, gcs):  # noqa: F811
        self.lab, self.gke, self.compute, self.gcs = lab, gke, compute, gcs
        self.disks: dict[str, str] = {}  # claim -> its disk (before the weekend)

    @property
    def site(self) -> str:
        return str(self.lab.path)

    @property
    def prefix(self) -> str:
        return f"olab/{self.lab.name}/"

    def objects(self) -> set[str]:
        return {b.name for b in self.gcs.client().list_blobs(BUCKET, prefix=self.prefix)}

    def manifest(self, point: str) -> dict:
        blob = self.gcs.client().bucket(BUCKET).blob(f"{self.prefix}restore-points/{point}/manifest.json")
        return json.loads(blob.download_as_text())

    def mark(self) -> dict | None:
        blob = self.gcs.client().bucket(BUCKET).blob(f"{self.prefix}teardown.json")
        return json.loads(blob.download_as_text()) if blob.exists() else None

    def bound(self) -> dict[str, str]:
        """claim -> the disk its volume is on, for every Bound claim."""
        found = {}
        for name in self.lab.kube.names("persistentvolumeclaims", NS):
            pvc = self.lab.kube.get("persistentvolumeclaims", name, NS)
            pv = self.lab.kube.get("persistentvolumes", pvc.spec.volume_name) if pvc.spec.volume_name else None
            if pvc.status.phase == "Bound" and pv is not None and pv.spec.csi:
                found[name] = pv.spec.csi.volume_handle.rsplit("/", 1)[-1]
        return found

    def set(self, **gke) -> None:
        data = yaml.safe_load(self.lab.path.read_text())
        data["gke"].update(gke)
        self.lab.path.write_text(yaml.safe_dump(data))


@pytest.fixture
def world(lab, gcs, monkeypatch):  # noqa: F811
    lab.kube.token = "anonymous"  # what olab's kubeconfig carries for anonymous (loopback) APIs
    with FakeGke(project=PROJECT, location=ZONE, operation_polls=2, cluster_endpoint=lab.kube.endpoint,
                 cluster_ca=lab.kube.ca_certificate) as gke, \
            FakeCompute(project=PROJECT, zone=ZONE, snapshot_polls=(2, 2), disk_polls=2, operation_polls=2) as compute:
        # A deleted cluster takes its API's objects with it (claims, volumes, Helm's releases).
        gke.on_cluster_deleted.append(lambda name: lab.kube.reset())
        monkeypatch.setenv("OLAB_STANDIN_GKE", gke.url)
        monkeypatch.setenv("OLAB_STANDIN_PYTHON", sys.executable)
        monkeypatch.setenv("OLAB_STANDIN_POLL", "0.05")
        w = World(lab, gke, compute, gcs)
        w.set(terraform_module=str(STANDIN), poll_seconds=0.1, cluster_ready_timeout_seconds=120,
              approval_timeout_seconds=10, shutdown={"mode": "destroy", "approve_destroy": True},
              apis={"container": gke.url, "compute": compute.url, "storage": gcs.url, "anonymous": True})
        report = provision_cluster(site=w.site)
        assert gke.cluster_status(CLUSTER) == "RUNNING" and report.kubeconfig
        lab.kube.add_claim(NS, "hub-db-dir", size="1Gi", reclaim_policy="Delete")
        for user in USERS:
            _, pv = lab.kube.add_claim(NS, f"claim-{user}", size="10Gi", reclaim_policy="Delete",
                                       annotations={"hub.jupyter.org/username": user},
                                       labels={"component": "singleuser-storage"})
            lab.hub.users[user] = {"servers": {"": {"name": "", "ready": True, "pending": None}}}
        for claim, disk in w.bound().items():
            compute.seed_disk(disk, size_gb=1 if claim == "hub-db-dir" else 10, labels={"goog-k8s-cluster-name": CLUSTER})
            w.disks[claim] = disk
        yield w


def test_destroy_and_restore_brings_every_claim_back_on_a_disk_from_its_own_snapshot(world):
    lab, compute, gke = world.lab, world.compute, world.gke
    assert lab.deploy().action == "start"
    before = dict(world.disks)
    assert sorted(before) == ["claim-ann", "claim-bob", "hub-db-dir"]

    planned = "\n".join(teardown(site=world.site, dry_run=True).lines())
    assert "a snapshot of each disk" in planned and "cluster olab and its pools (terraform), then the 3 disks" in planned, planned
    assert gke.cluster_status(CLUSTER) == "RUNNING" and compute.snapshot_names() == [], "a dry run changes nothing"

    report = teardown(site=world.site)
    point = report.restore_point
    assert sorted(report.users) == USERS
    assert all(not u["servers"] for u in lab.hub.users.values()), "every user server was stopped through the hub"
    assert gke.cluster_status(CLUSTER) is None, "terraform removed the cluster and its pools"
    assert compute.disk_names() == [], "every disk deleted, each after its READY snapshot"
    manifest = world.manifest(point)
    assert manifest["mode"] == "destroy" and manifest["image_ref"]["digest"] == image().digest
    snaps = manifest["snapshots"]
    assert set(snaps) == set(before)
    for claim, disk in before.items():
        snap = compute.snapshot(snaps[claim]["name"])
        assert snap.status == "READY" and snap.source_disk.endswith(f"/disks/{disk}") and snaps[claim]["source_disk"] == disk
        assert snap.labels["olab-restore-point"] == point.lower() and snap.labels["olab-site"] == lab.name
    assert f"{world.prefix}restore-points/{point}/COMPLETE" in world.objects()
    assert world.mark()["phase"] == "torn-down"
    cost = latest_artifact(f"{lab.name}-teardown-cost").data
    assert "cluster" in cost and "node-hours" in cost
    plan = latest_artifact(f"{lab.name}-teardown-plan").data
    assert "terraform_data.cluster[0]" in plan and "gke.shutdown.approve_destroy" in plan, plan
    assert "delete | disk europe-west2-a/" in plan

    assert teardown(site=world.site).already_torn_down
    refused = lab.deploy(image())
    assert isinstance(refused, Refused) and "is torn down" in str(refused)

    back = restore(site=world.site)
    assert back.restore_point == point and sorted(u.user for u in back.users) == USERS
    assert gke.cluster_status(CLUSTER) == "RUNNING" and gke.pool_size(CLUSTER, "user") == 0
    assert world.bound() == before, "every claim, by its own name, on a disk of its own name again"
    for claim, disk in before.items():
        made = compute.disk(disk)
        assert made.status == "READY" and made.source_snapshot.endswith(f"/snapshots/{snaps[claim]['name']}"), (
            f"{claim}: disk {disk} is not made from its own snapshot")
        pv = lab.kube.get("persistentvolumes", lab.kube.get("persistentvolumeclaims", claim, NS).spec.volume_name)
        assert pv.spec.persistent_volume_reclaim_policy == "Retain", "a restored disk is never deleted with its claim"
    hub_claim = lab.kube.get("persistentvolumeclaims", "hub-db-dir", NS)
    assert hub_claim.metadata.annotations["meta.helm.sh/release-name"] == "olab", "the chart adopts the hub's claim"
    ann = lab.kube.get("persistentvolumeclaims", "claim-ann", NS)
    assert ann.metadata.annotations["hub.jupyter.org/username"] == "ann"
    assert back.hub.image.digest == image().digest and lab.history()[-1][1] == "deployed"
    assert world.mark() is None


def test_a_snapshot_that_fails_stops_the_teardown_before_any_deletion(world):
    lab, compute, gke = world.lab, world.compute, world.gke
    lab.deploy()
    compute.fail_snapshot(world.disks["claim-bob"])
    state = teardown(site=world.site, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert world.disks["claim-bob"] in message and "FAILED" in message.upper(), message
    assert gke.cluster_status(CLUSTER) == "RUNNING", "the cluster is untouched"
    assert sorted(compute.disk_names()) == sorted(world.disks.values()), "no disk was deleted"
    assert world.mark() is None
    points = [o for o in world.objects() if o.endswith("/COMPLETE")]
    assert points == [], "the restore point is not complete"


def test_without_an_approval_nothing_is_deleted(world):
    lab, compute, gke = world.lab, world.compute, world.gke
    lab.deploy()
    world.set(shutdown={"mode": "destroy", "approve_destroy": False})
    with pytest.raises(Refused, match=r"was not approved within 10s; nothing was changed"):
        teardown(site=world.site)
    assert gke.cluster_status(CLUSTER) == "RUNNING" and sorted(compute.disk_names()) == sorted(world.disks.values())
    assert world.mark() is None, "no deletion began"
    assert "waits for an approval" in latest_artifact(f"{lab.name}-teardown-plan").data

    # The next teardown (or `olab teardown --approve`) approves it itself: it finishes.
    report = teardown(site=world.site, approve=True)
    assert gke.cluster_status(CLUSTER) is None and compute.disk_names() == [] and world.mark()["phase"] == "torn-down"
    assert report.pruned == [], "the refused run's complete restore point is kept until retention drops it"
