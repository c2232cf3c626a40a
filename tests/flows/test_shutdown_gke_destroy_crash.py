"""The destroy-mode weekend shutdown of a gke site killed after every step and run again
converges and loses nothing (as test_shutdown_gke_crash.py shows for scale-to-zero).

``olab teardown`` / ``olab restore`` run as the CLI in a subprocess with
``OLAB_CRASH_AFTER=<flow>:<step>`` (SIGKILL right after that step), then again without it;
the fakes (GKE, Compute, Kubernetes, the hub, fake-gcs-server, OpenBao, helm) run in this
process and are reached over HTTP, terraform's stand-in module drives the fake GKE API.
Each cycle kills one teardown step and one restore step (every step of both is killed once).

Checked at every kill, before the rerun: every disk the site had is either still there or
kept by a READY snapshot of it that a COMPLETE restore point names. After every rerun: the
teardown left no cluster and no disk, one mark; the restore left every claim, by its own
name, bound to a disk made from that claim's snapshot of the point restored, no mark.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

from prefect.settings import PREFECT_API_URL

from core.config import load_site

from tests.conftest import REPO
from tests.flows.test_deploy_gke import NS, bao, gcs, lab  # noqa: F401 - fixtures
from tests.flows.test_shutdown_gke_destroy import CLUSTER, World, pytestmark, world  # noqa: F401 - fixtures
from tests.tasks.test_helm import z2jh_repo  # noqa: F401 - a fixture lab needs

TEARDOWN_STEPS = ["preflight", "stop-servers", "stop-hub", "manifest", "archive", "verify", "mark", "cluster-destroyed", "delete"]
RESTORE_STEPS = ["mark", "provision", "disks", "unpack", "swap", "unmark", "deploy"]


def cli(world: World, runs: list, *args: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("OLAB_CRASH_AFTER", None)
    if crash:
        env["OLAB_CRASH_AFTER"] = crash
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "olab.cli", *args, "--site", world.site], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    runs.append((" ".join(args) + (f" killed after {crash}" if crash else ""), time.monotonic() - started, done.returncode))
    return done


def kept(world: World, disks: dict[str, str], what: str) -> None:
    """Every disk is there, or kept by a READY snapshot of it named by a COMPLETE restore point."""
    present = set(world.compute.disk_names())
    objects = world.objects()
    complete = [o.split("/")[3] for o in objects if o.endswith("/COMPLETE")]
    snapshots = {}
    for point in complete:
        for claim, snap in (world.manifest(point).get("snapshots") or {}).items():
            found = world.compute.snapshot(snap["name"])
            if found is not None and found.status == "READY" and found.source_disk.endswith(f"/disks/{disks[claim]}"):
                snapshots[claim] = snap["name"]
    lost = [claim for claim, disk in disks.items() if disk not in present and claim not in snapshots]
    assert not lost, f"{what}: the disks of {lost} are gone with no READY snapshot in a COMPLETE restore point"


def test_killed_after_every_step_and_run_again_converges_and_loses_nothing(world):
    lab, compute, gke = world.lab, world.compute, world.gke
    assert lab.deploy().action == "start"
    disks = dict(world.disks)
    runs: list = []

    def killed_then_run(flow: str, step: str | None) -> str:
        """``flow`` killed after ``step`` (when there is one), the disks checked, then run again."""
        what = f"{flow} killed after {step}" if step else flow
        if step:
            killed = cli(world, runs, flow, crash=f"{flow}:{step}")
            assert killed.returncode == -9, f"{flow} did not die after {step}: {killed.stderr[-2000:]}"
            kept(world, disks, what)
        done = cli(world, runs, flow)
        assert done.returncode == 0, f"{what}, then run again: {done.stderr[-3000:]}"
        return what

    for teardown_step, restore_step in itertools.zip_longest(TEARDOWN_STEPS, RESTORE_STEPS):
        lab.hub.users["ann"]["servers"][""] = {"name": "", "ready": True, "pending": None}  # someone working late
        what = killed_then_run("teardown", teardown_step)
        kept(world, disks, f"{what}, then run again")
        mark = world.mark()
        assert mark is not None and mark["phase"] == "torn-down", f"{what}: {mark}"
        point = mark["restore_point"]
        assert gke.cluster_status(CLUSTER) is None and compute.disk_names() == [], f"{what}: cluster or disks left"
        assert not any(u["servers"] for u in lab.hub.users.values()), f"{what}: a user server still runs"

        what = killed_then_run("restore", restore_step)
        assert world.mark() is None, f"{what}: a mark is left"
        assert world.bound() == disks, f"{what}: claims and disks: {world.bound()}"
        snaps = world.manifest(point)["snapshots"]
        for claim, disk in disks.items():
            made = compute.disk(disk)
            assert made.source_snapshot.endswith(f"/snapshots/{snaps[claim]['name']}"), (
                f"{what}: {claim}'s disk is not made from its snapshot of {point}")
        assert gke.cluster_status(CLUSTER) == "RUNNING" and lab.history()[-1][1] == "deployed", what

    # Retention: the points the bucket keeps, and at Compute only their snapshots.
    points = {o.split("/")[3] for o in world.objects() if "/restore-points/" in o}
    complete = {o.split("/")[3] for o in world.objects() if o.endswith("/COMPLETE")}
    keep = load_site(world.site).config.backups.keep
    assert len(complete) <= keep and points == complete, (sorted(points), sorted(complete))
    kept_snapshots = {s["name"] for p in points for s in world.manifest(p)["snapshots"].values()}
    assert set(compute.snapshot_names()) == kept_snapshots, "a dropped restore point's snapshots went with it"

    total = sum(seconds for _, seconds, _ in runs)
    print(f"\n{len(runs)} CLI runs in {total:.0f}s")
    for what, seconds, code in runs:
        print(f"  {seconds:6.1f}s  exit {code:3d}  {what}")
