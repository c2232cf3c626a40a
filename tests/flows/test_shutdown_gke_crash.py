"""The weekend shutdown of a gke site (scale-to-zero) killed at every step and run again
converges and loses nothing, as test_teardown.py shows for the local target.

``olab teardown`` / ``olab restore`` run as the CLI in a subprocess with
``OLAB_CRASH_AFTER=<flow>:<step>`` (core/faults.py: SIGKILL right after that step), then
again without it. The fakes run in this process (threads on loopback, fake-gcs-server
beside it) and the subprocess reaches them over HTTP: the fake GKE API (node pools), the
fake Kubernetes API (claims, volumes, helm's release secrets), the fake hub, fake-gcs-server
(the state bucket: restore points and the teardown mark), OpenBao, the fake helm.

Two things are added to the fakes here, as GKE behaves:

* the hub runs on the core pool: while that pool has 0 nodes the hub's URL answers 502 (a
  Google load balancer with no healthy backend), so a rerun that needed the hub after the
  pool was scaled down fails as it would on GKE;
* the bucket is read at the instant each ``setSize`` request reaches the fake GKE (the CLI
  waits for the answer, so the bucket cannot change meanwhile): which restore points were
  COMPLETE, and what the mark said, when each pool was scaled down.

After every rerun: the pools' sizes, every claim on its original disk, one teardown mark
(or none), a COMPLETE restore point before any scale-down, and no helm upgrade by a
restore that found nothing changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from google.cloud import container_v1
from prefect.settings import PREFECT_API_URL

from core.config import load_site
from tasks.hub_api import hub_version
from tests.conftest import REPO
from tests.fakes.gke import FakeGke, SeedPool
from tests.flows.test_deploy_gke import NS, Lab, bao, gcs, lab  # noqa: F401 - fixtures
from tests.flows.test_deploy_gke import pytestmark as deploy_gke_marks
from tests.tasks.test_helm import z2jh_repo  # noqa: F401 - a fixture lab needs

pytestmark = deploy_gke_marks  # slow (flows on a Prefect server), and the skips of test_deploy_gke's fakes

USERS = ["ann", "bob"]
CLUSTER = "olab"
BUCKET = "olab-tfstate"
TEARDOWN_STEPS = ["preflight", "stop-servers", "stop-hub", "archive", "verify", "mark", "delete"]
RESTORE_STEPS = ["mark", "unpack", "swap", "unmark", "deploy"]
HUB_VERSION = "5.3.0"  # what the fake hub answers


@dataclass(frozen=True)
class Resize:
    """One setSize request as the fake GKE got it, and the bucket at that instant."""

    pool: str
    before: int  # the pool's nodes when the request came
    nodes: int  # the nodes asked for
    objects: frozenset[str]  # every object under the site's prefix
    mark: dict | None  # the teardown mark's content, if there was one

    @property
    def down(self) -> bool:
        return self.nodes < self.before


@dataclass
class Site:
    lab: Lab
    cluster: FakeGke
    gcs: object
    resizes: list[Resize] = field(default_factory=list)
    hub_down_answers: int = 0  # requests the hub answered 502 (its pool at 0 nodes)
    runs: list[tuple[str, float, int]] = field(default_factory=list)  # (what, seconds, exit code)

    @property
    def prefix(self) -> str:
        return f"olab/{self.lab.name}/"

    def bucket(self) -> tuple[frozenset[str], dict | None]:
        client = self.gcs.client()
        names = frozenset(b.name for b in client.list_blobs(BUCKET, prefix=self.prefix))
        mark = self.prefix + "teardown.json"
        found = json.loads(client.bucket(BUCKET).blob(mark).download_as_text()) if mark in names else None
        return names, found

    def sizes(self) -> tuple[int, int]:
        return self.cluster.pool_size(CLUSTER, "core"), self.cluster.pool_size(CLUSTER, "user")

    def autoscaler_grows_user_pool(self, nodes: int) -> None:
        """As the user pool's autoscaler does during the week (the fake GKE has no autoscaler)."""
        with self.cluster.lock:
            self.cluster.clusters[(self.cluster.project, self.cluster.location, CLUSTER)].pools["user"].size = nodes

    def cli(self, *args: str, crash: str | None = None) -> subprocess.CompletedProcess:
        """``python -m olab.cli ARGS --site PATH`` with this session's Prefect server, and the
        environment the fixtures set (VAULT_TOKEN, HELM_*_HOME; OLAB_HOME/OLAB_PROJECT from conftest)."""
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        env.pop("OLAB_CRASH_AFTER", None)
        if crash:
            env["OLAB_CRASH_AFTER"] = crash
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "olab.cli", *args, "--site", str(self.lab.path)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        self.runs.append((f"{' '.join(args)}" + (f" killed after {crash}" if crash else ""), time.monotonic() - started, done.returncode))
        return done


def bindings(lab: Lab) -> dict[str, tuple]:
    """Every claim in the namespace: its uid and phase, its volume, the volume's disk, whom
    the volume is bound to and its phase, as the fake Kubernetes API holds them."""
    found = {}
    for name in lab.kube.names("persistentvolumeclaims", NS):
        pvc = lab.kube.get("persistentvolumeclaims", name, NS)
        pv = lab.kube.get("persistentvolumes", pvc.spec.volume_name) if pvc.spec.volume_name else None
        found[name] = (
            pvc.metadata.uid, pvc.status.phase, pvc.spec.volume_name,
            pv.spec.csi.volume_handle if pv is not None and pv.spec.csi else None,
            pv.spec.claim_ref.uid if pv is not None and pv.spec.claim_ref else None,
            pv.status.phase if pv is not None else None,
        )
    return found


@pytest.fixture
def site(lab, gcs):  # noqa: F811
    with FakeGke(project="olab-test-project", location="europe-west2-a", operation_polls=2) as cluster:
        cluster.seed_cluster(CLUSTER, [SeedPool("core", nodes=1), SeedPool("user", nodes=2, min_nodes=0, max_nodes=3)])
        data = yaml.safe_load(lab.path.read_text())
        data["gke"]["apis"]["container"] = cluster.url
        data["gke"]["poll_seconds"] = 0.1
        lab.path.write_text(yaml.safe_dump(data))
        lab.kube.add_claim(NS, "hub-db-dir", size="1Gi", reclaim_policy="Retain")
        for user in USERS:
            lab.kube.add_claim(NS, f"claim-{user}", size="10Gi", reclaim_policy="Retain",
                               annotations={"hub.jupyter.org/username": user})
            lab.hub.users[user] = {"servers": {"": {"name": "", "ready": True, "pending": None}}}
        the = Site(lab=lab, cluster=cluster, gcs=gcs)

        answer = cluster.answer

        def record(method: str, path: str, query: str, raw: str):
            # Called under cluster.lock: the fake's state is read directly.
            if method == "POST" and path.endswith(":setSize"):
                pool = path.rsplit("/", 1)[-1].removesuffix(":setSize")
                nodes = container_v1.SetNodePoolSizeRequest.from_json(raw or "{}", ignore_unknown_fields=True).node_count
                before = cluster.clusters[(cluster.project, cluster.location, CLUSTER)].pools[pool].size
                the.resizes.append(Resize(pool, before, nodes, *the.bucket()))
            return answer(method, path, query, raw)

        cluster.answer = record

        hub_handler = lab.hub.server.RequestHandlerClass

        class BehindTheCorePool(hub_handler):
            def _handle(self, method: str) -> None:
                if cluster.pool_size(CLUSTER, "core") == 0:
                    the.hub_down_answers += 1
                    return self._send(502, "<html><head><title>502 Server Error</title></head></html>", "text/html")
                return super()._handle(method)

        lab.hub.server.RequestHandlerClass = BehindTheCorePool
        yield the


def test_killed_at_every_step_and_run_again_converges_and_loses_nothing(site):
    lab, prefix = site.lab, site.prefix
    deployed = lab.deploy()
    assert deployed.action == "start", deployed
    claims = bindings(lab)
    assert sorted(claims) == ["claim-ann", "claim-bob", "hub-db-dir"]
    assert all(c[1] == "Bound" and c[3] and c[5] == "Bound" for c in claims.values()), claims
    config = load_site(str(lab.path)).config.gke
    site_sizes = (max(config.core_pool.min_nodes, 1), config.user_pool.min_nodes)
    assert site_sizes == (1, 0)
    assert site.sizes() == (1, 2) and hub_version(lab.hub.url) == HUB_VERSION

    def torn_down(since: int, helm_calls: int, what: str) -> str:
        """The site after a teardown converged; the restore point its mark names."""
        assert site.sizes() == (0, 0), f"{what}: pools (core, user)"
        assert bindings(lab) == claims, f"{what}: a claim is no longer bound to its original disk"
        objects, mark = site.bucket()
        assert sorted(o for o in objects if o.rsplit("/", 1)[-1] == "teardown.json") == [prefix + "teardown.json"], what
        assert mark is not None and mark["phase"] == "torn-down", f"{what}: {mark}"
        point = mark["restore_point"]
        assert {f"{prefix}restore-points/{point}/manifest.json", f"{prefix}restore-points/{point}/COMPLETE"} <= objects, what
        downs = [r for r in site.resizes[since:] if r.down]
        assert {r.pool for r in downs} == {"core", "user"}, f"{what}: every pool was scaled down: {site.resizes[since:]}"
        for r in downs:
            assert f"{prefix}restore-points/{point}/COMPLETE" in r.objects, (
                f"{what}: pool {r.pool} scaled down {r.before} -> {r.nodes} before restore point {point} was complete")
            assert r.mark is not None and r.mark["restore_point"] == point and r.mark["phase"] in ("deleting", "torn-down"), (
                f"{what}: pool {r.pool} scaled down while the mark was {r.mark}")
        assert not any(u["servers"] for u in lab.hub.users.values()), f"{what}: a user server still runs"
        assert len(lab.helm.calls()) == helm_calls, f"{what}: teardown ran helm"
        assert hub_version(lab.hub.url) is None, f"{what}: the hub answers with its pool at 0 nodes"
        return point

    def restored(since: int, helm_calls: int, point: str, what: str) -> None:
        assert site.sizes() == site_sizes, f"{what}: pools (core, user)"
        assert bindings(lab) == claims, f"{what}: a claim is no longer bound to its original disk"
        objects, mark = site.bucket()
        assert mark is None and not [o for o in objects if o.rsplit("/", 1)[-1] == "teardown.json"], f"{what}: a mark is left: {mark}"
        assert f"{prefix}restore-points/{point}/COMPLETE" in objects, f"{what}: restore point {point} is gone"
        assert not [r for r in site.resizes[since:] if r.down], f"{what}: restore scaled a pool down"
        assert len(lab.helm.calls()) == helm_calls, (
            f"{what}: nothing changed, yet helm ran {[c['argv'][1:3] for c in lab.helm.calls()[helm_calls:]]}")
        assert lab.history()[-1][:2] == (1, "deployed"), f"{what}: {lab.history()}"
        assert hub_version(lab.hub.url) == HUB_VERSION, f"{what}: the hub does not answer"

    def teardown(crash: str | None = None) -> subprocess.CompletedProcess:
        lab.hub.users["ann"]["servers"][""] = {"name": "", "ready": True, "pending": None}  # someone working late
        return site.cli("teardown", crash=crash)

    for step in TEARDOWN_STEPS:
        what = f"teardown killed after {step}"
        site.autoscaler_grows_user_pool(2)
        since, helm_calls = len(site.resizes), len(lab.helm.calls())
        killed = teardown(f"teardown:{step}")
        assert killed.returncode == -9, f"teardown did not die after {step}: {killed.stderr[-2000:]}"
        rerun = site.cli("teardown")
        assert rerun.returncode == 0, f"teardown rerun after a kill at {step}: {rerun.stderr[-3000:]}"
        point = torn_down(since, helm_calls, what)
        since = len(site.resizes)
        ok = site.cli("restore")
        assert ok.returncode == 0, f"restore after a kill at teardown:{step}: {ok.stderr[-3000:]}"
        assert f"restored from {point}" in ok.stdout and "(unchanged)" in ok.stdout, f"{what}: {ok.stdout}"
        restored(since, helm_calls, point, f"restore after a {what}")

    for step in RESTORE_STEPS:
        what = f"restore killed after {step}"
        site.autoscaler_grows_user_pool(2)
        since, helm_calls = len(site.resizes), len(lab.helm.calls())
        done = teardown()
        assert done.returncode == 0, f"teardown before a kill at restore:{step}: {done.stderr[-3000:]}"
        point = torn_down(since, helm_calls, f"teardown before a {what}")
        since = len(site.resizes)
        killed = site.cli("restore", crash=f"restore:{step}")
        assert killed.returncode == -9, f"restore did not die after {step}: {killed.stderr[-2000:]}"
        rerun = site.cli("restore")
        assert rerun.returncode == 0, f"restore rerun after a kill at {step}: {rerun.stderr[-3000:]}"
        # Killed before its mark was cleared, it restores again; after, it only makes sure the hub is deployed.
        said = f"restored from {point}" if step in ("mark", "unpack", "swap") else "hub ensured"
        assert said in rerun.stdout, f"{what}: {rerun.stdout}"
        restored(since, helm_calls, point, what)

    points = {o.split("/")[3] for o in site.bucket()[0] if "/restore-points/" in o}
    complete = {p for p in points if f"{prefix}restore-points/{p}/COMPLETE" in site.bucket()[0]}
    keep = load_site(str(lab.path)).config.backups.keep
    assert len(complete) <= keep, f"retention keeps {keep}: {sorted(complete)}"

    # The order checks above saw every resize the fake GKE was asked for.
    with site.cluster.lock:
        asked = [p for m, p in site.cluster.requests if m == "POST" and p.endswith(":setSize")]
    assert len(asked) == len(site.resizes) and len([r for r in site.resizes if r.down]) >= 2 * len(TEARDOWN_STEPS + RESTORE_STEPS)

    total = sum(seconds for _, seconds, _ in site.runs)
    print(f"\n{len(site.runs)} CLI runs in {total:.0f}s; the hub answered 502 {site.hub_down_answers} times")
    for what, seconds, code in site.runs:
        print(f"  {seconds:6.1f}s  exit {code:3d}  {what}")
