"""OCI path: unchanged-image build time, and labs inside the image against `pytest --nbmake -n 2`.

    OLAB_HOME=/tmp/olab-bench-oci-home python bench/bench_oci.py [--runs 5] [--builds 5]

Needs buildah, podman, runc, docker-registry and debootstrap (./setup.sh); the
script exits with a message where any is missing. Set OLAB_HOME to a folder that
is kept to reuse the built images across runs (the first build of the debootstrap
base and the user image takes minutes and is not measured).

One run measures:

- ``build_image`` with unchanged inputs (the registry already has the content-hash
  tag), ``--builds`` times (0: skip); goal: <= 1 s each (median reported), with a
  breakdown of the steps of ``flows.build_image._build_oci`` timed outside the flow
  and the cost of an empty Prefect flow;
- the labs in the image, ``--runs`` rounds, medians, against the named baseline
  ``pytest --nbmake -n 2`` run in ONE container of a derived image (``FROM <pinned
  image>`` + ``pip install nbmake pytest-xdist``) on the same labs staged as .ipynb:
  ``olab test`` (the ``test-notebooks`` flow, lab result cache cleared; goal <= 0.8x of
  nbmake) and its rerun with nothing changed (goal <= 0.1x of nbmake). Beside them,
  diagnostics that say where the time went, each the lab runner without Prefect, one step
  at a time: one container per lab with a kernel started the ordinary way (what ``olab
  test`` did before); one container with ordinary kernels; one container with kernels
  forked from a zygote that did the shared imports (what ``olab test`` runs). The order of
  the five rotates from round to round, so that a change of load on a shared machine does
  not always fall on the same one.

Results go to bench/results/oci.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (sets OLAB_HOME, OLAB_PROJECT, Prefect analytics off)
from benchlib import BENCH_ROOT, banner, clear_lab_cache, fmt_table, free_port, median, timed, write_results, write_site  # noqa: E402

NEEDED = ("buildah", "podman", "runc", "docker-registry", "debootstrap")
GOAL_BUILD_SECONDS = 1.0
GOAL_LABS_VS_NBMAKE = 0.8
GOAL_RERUN_VS_NBMAKE = 0.1
EXTRA_PACKAGES = ["nbmake", "pytest-xdist"]
LAB_RUNS = ("nbmake", "olab", "per-lab containers, fresh kernels", "one container, fresh kernels",
            "one container, forked kernels")


def build_breakdown(site_path: Path) -> dict[str, float]:
    """The steps of an unchanged OCI build, each timed on its own (outside any flow)."""
    from core.config import load_site
    from core.planning import image_tag
    from tasks.oci import engine_for, ensure_debootstrap_base, insecure_registries, resolve_builder
    from tasks.python_env import read_context
    from tasks.local_registry import ensure_local_registry

    out: dict[str, float] = {}
    t, site = timed(lambda: load_site(str(site_path)))
    out["load_site"] = t
    settings = site.config.image
    t, _ = timed(lambda: resolve_builder(settings.builder))
    out["resolve_builder (which)"] = t
    t, engine = timed(lambda: engine_for("buildah", site.paths.containers, insecure_registries(site)))
    out["engine_for (write 3 conf files)"] = t
    t, registry = timed(lambda: ensure_local_registry(site.paths.containers, settings.registry))
    out["ensure_local_registry (GET /v2/)"] = t
    t, files = timed(lambda: read_context(site.image_context))
    out["read_context"] = t
    t, base = timed(lambda: ensure_debootstrap_base(engine, "bookworm", site.paths.containers))
    out["ensure_debootstrap_base (podman image inspect)"] = t
    t, base_id = timed(lambda: engine.image_id(base))
    out["engine.image_id(base) (podman image inspect)"] = t
    tag = image_tag({**files, "\0base": f"{base}@{base_id}".encode()}, "any", "oci")
    t, digest = timed(lambda: registry.manifest_digest(settings.name, tag[:20]))
    out["registry HEAD manifest"] = t
    assert digest, "the registry should already hold the image"
    return out


def empty_flow_seconds(runs: int = 5) -> float:
    from prefect import flow

    @flow(name="bench-empty")
    def empty() -> int:
        return 1

    empty()  # first call registers the flow
    return median([timed(empty)[0] for _ in range(runs)])


def unchanged_builds(site_path: Path, image, builds: int) -> dict:
    from flows.build_image import build_image

    banner(f"build_image with unchanged inputs, {builds} times")
    seconds = []
    for i in range(builds):
        t, again = timed(lambda: build_image(site=str(site_path)))
        assert again == image, "unchanged inputs must give the same image"
        seconds.append(t)
        print(f"[bench] unchanged build {i + 1}: {t:.3f}s", flush=True)
    # Diagnostic: the same with the heartbeat from Prefect's engine, as olab's commands had
    # it before (its thread's exit join waits for its current 1 s sleep:
    # prefect/flow_engine.py _send_heartbeats); olab's comes from the lifecycle guard.
    engine_heartbeat = []
    with benchlib.flow_heartbeats(True):
        for _ in range(builds):
            t, again = timed(lambda: build_image(site=str(site_path)))
            assert again == image
            engine_heartbeat.append(t)
        empty_engine_heartbeat = empty_flow_seconds()
    print(f"[bench] unchanged build, Prefect's engine heartbeat: median {median(engine_heartbeat):.3f}s "
          f"{[round(x, 3) for x in engine_heartbeat]}")
    breakdown = build_breakdown(site_path)
    empty = empty_flow_seconds()
    for name, value in breakdown.items():
        print(f"[bench]   {name}: {value * 1000:.0f} ms")
    print(f"[bench]   empty Prefect flow: {empty * 1000:.0f} ms ({empty_engine_heartbeat * 1000:.0f} ms with Prefect's engine heartbeat)")
    return {
        "seconds": seconds,
        "median": median(seconds),
        "goal_seconds": GOAL_BUILD_SECONDS,
        "steps_outside_flow_seconds": breakdown,
        "steps_total_seconds": sum(breakdown.values()),
        "empty_prefect_flow_seconds": empty,
        "prefect_engine_heartbeat_seconds": engine_heartbeat,
        "prefect_engine_heartbeat_median": median(engine_heartbeat),
        "empty_prefect_flow_prefect_engine_heartbeat_seconds": empty_engine_heartbeat,
    }


def derived_image(engine, pinned: str, work: Path) -> str:
    """FROM the pinned user image, plus nbmake and pytest-xdist in its venv."""
    ref = "localhost/olab-nbmake:" + pinned.rsplit(":", 1)[1][:16]
    if engine.image_id(ref):
        return ref
    context = work / "nbmake-context"
    context.mkdir(parents=True, exist_ok=True)
    (context / "Containerfile").write_text(
        f"FROM {pinned}\nARG PIP_CERT=\nUSER root\nRUN /opt/olab/bin/pip install --no-cache-dir {' '.join(EXTRA_PACKAGES)}\nUSER jovyan\n"
    )
    argv = ["buildah", "build", "--isolation", "chroot", "--pull=never", "-t", ref]
    ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if ca and Path(ca).is_file():
        argv += ["-v", f"{ca}:/tmp/olab-ca.crt:ro", "--build-arg", "PIP_CERT=/tmp/olab-ca.crt"]
    argv += ["-f", str(context / "Containerfile"), str(context)]
    subprocess.run(argv, env=engine.env, check=True)
    return ref


def run_nbmake(engine, ref: str, staged: Path, names: list[str], timeout: int) -> float:
    argv = engine.run_prefix([(staged, "/labs")]) + ["-e", "MPLBACKEND=agg", ref]
    argv += ["python3", "-m", "pytest", "--nbmake", f"--nbmake-timeout={timeout}", "-n", "2", "-q", "-p", "no:cacheprovider"]
    argv += [f"/labs/{n}" for n in names]
    started = time.perf_counter()
    done = subprocess.run(argv, env=engine.env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"nbmake failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return seconds


def run_runner(engine, image, notebooks: list[Path], timeout: int, parallel: int, kernels: str) -> tuple[float, list[dict]]:
    """The lab runner in one container of the image, as run_labs starts it, with ``kernels``;
    the seconds and each lab's result line (kernel_seconds included)."""
    from core.labrunner import RESULT_MARK
    from tasks.notebooks import RUNNER_IN_CONTAINER, labs_command

    with tempfile.TemporaryDirectory(prefix="bench-runner-", dir=BENCH_ROOT) as work:
        argv, env = labs_command(image, notebooks, timeout, parallel, Path(work), engine)
        at = argv.index(RUNNER_IN_CONTAINER) + 1
        argv[at:at] = ["--kernels", kernels]
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    results = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith(RESULT_MARK + " ")]
    if done.returncode != 0 or len(results) != len(notebooks) or not all(r["status"] == "passed" for r in results):
        raise RuntimeError(f"lab runner ({kernels}) failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return seconds, results


def run_per_lab_containers(engine, image, notebooks: list[Path], timeout: int) -> tuple[float, list[dict]]:
    """What olab test did before: a container per lab, a kernel started the ordinary way in
    each, two at a time."""
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda nb: run_runner(engine, image, [nb], timeout, 1, "fresh")[1], notebooks))
    return time.perf_counter() - started, [r for results in done for r in results]


def machine_load() -> float:
    return round(os.getloadavg()[0], 2)


def labs_section(site, site_path: Path, image, engine, rounds: int) -> dict:
    from flows.test_notebooks import test_notebooks
    from tasks.notebooks import discover_labs, stage_lab

    banner("derived nbmake image (not measured)")
    derived = derived_image(engine, image.pinned, BENCH_ROOT)
    print(f"[bench] baseline image: {derived}", flush=True)
    labs = discover_labs(site.labs_dir)
    staged = Path(tempfile.mkdtemp(prefix="nbmake-labs-", dir=BENCH_ROOT))
    os.chmod(staged, 0o755)
    notebooks = [stage_lab(lab, staged) for lab in labs]
    names = [nb.name for nb in notebooks]
    timeout = site.config.labs.cell_timeout_seconds
    parallel = site.config.labs.parallelism or os.cpu_count() or 2

    def olab() -> tuple[float, list[dict]]:
        clear_lab_cache()
        seconds, report = timed(lambda: test_notebooks(site=str(site_path), image=image))
        assert report.passed and not any(x.cached for x in report.results)
        return seconds, [{"lab": x.lab, "seconds": x.seconds} for x in report.results]

    measure = {
        "nbmake": lambda: (run_nbmake(engine, derived, staged, names, timeout), []),
        "olab": olab,
        "per-lab containers, fresh kernels": lambda: run_per_lab_containers(engine, image, notebooks, timeout),
        "one container, fresh kernels": lambda: run_runner(engine, image, notebooks, timeout, parallel, "fresh"),
        "one container, forked kernels": lambda: run_runner(engine, image, notebooks, timeout, parallel, "forked"),
    }
    # One unmeasured run of each, so that none pays a first-start cost the others do not.
    banner("warm-up (not measured): one run of each")
    for name, call in measure.items():
        print(f"[bench] warm-up {name}: {call()[0]:.1f}s", flush=True)

    banner(f"labs: {rounds} rounds of {', '.join(LAB_RUNS)}; the order rotates")
    seconds: dict[str, list[float]] = {name: [] for name in LAB_RUNS}
    per_lab: dict[str, list[list[dict]]] = {name: [] for name in LAB_RUNS}
    loads: list[float] = []
    busy: list[list[str]] = []
    for r in range(rounds):
        order = LAB_RUNS[r % len(LAB_RUNS):] + LAB_RUNS[: r % len(LAB_RUNS)]
        loads.append(machine_load())
        busy.append(benchlib.others_busy("bench_oci"))
        line = []
        for name in order:
            t, results = measure[name]()
            seconds[name].append(t)
            per_lab[name].append(results)
            line.append(f"{name} {t:.2f}s")
        print(f"[bench] round {r + 1} (load {loads[-1]}): " + ", ".join(line), flush=True)
    loads.append(machine_load())

    banner(f"olab test rerun with nothing changed, {rounds} times")
    reruns = []
    for _ in range(rounds):
        t, report = timed(lambda: test_notebooks(site=str(site_path), image=image))
        assert report.passed and all(x.cached for x in report.results), "a rerun must reuse every lab"
        reruns.append(t)
    print(f"[bench] reruns: {[round(x, 2) for x in reruns]}", flush=True)

    medians = {name: median(values) for name, values in seconds.items()}
    nb = medians["nbmake"]
    ratios_by_round = [round(o / n, 3) for o, n in zip(seconds["olab"], seconds["nbmake"])]
    return {
        "labs": names,
        "parallelism": parallel,
        "baseline": f"podman run {derived} pytest --nbmake --nbmake-timeout={timeout} -n 2 (one container)",
        "seconds": seconds,
        "median_seconds": medians,
        "ratio_to_nbmake": {name: round(m / nb, 3) for name, m in medians.items()},
        "olab_over_nbmake_by_round": ratios_by_round,
        "rerun_seconds": reruns,
        "rerun_median": median(reruns),
        "rerun_over_nbmake": round(median(reruns) / nb, 4),
        "rerun_over_olab": round(median(reruns) / medians["olab"], 4),
        "per_lab": per_lab,
        "load_1min_at_round_starts_and_end": loads,
        "other_test_or_bench_processes_at_round_starts": busy,
        "goals": {
            "olab_over_nbmake": {"max": GOAL_LABS_VS_NBMAKE, "met": medians["olab"] / nb <= GOAL_LABS_VS_NBMAKE},
            "rerun_over_nbmake": {"max": GOAL_RERUN_VS_NBMAKE, "met": median(reruns) / nb <= GOAL_RERUN_VS_NBMAKE},
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5, help="rounds of the lab comparison (medians)")
    parser.add_argument("--builds", type=int, default=5, help="unchanged builds to time (0: none)")
    args = parser.parse_args()
    if benchlib.tools_missing(NEEDED):
        return 0
    logging.getLogger("prefect").setLevel(logging.WARNING)

    from core.config import load_site, olab_home
    from tasks.oci import engine_for, stop_api_socket
    from tasks.local_registry import registry_login, stop_local_registry

    registry = f"127.0.0.1:{free_port()}"
    site_path = write_site("oci", image={"builder": "buildah", "base_image": "debootstrap:bookworm", "registry": registry})
    site = load_site(str(site_path))
    store = olab_home() / "containers"
    result: dict = {"registry": registry, "olab_home": str(olab_home())}
    try:
        with benchlib.prefect_server():
            from flows.build_image import build_image

            banner("first build (not measured; minutes when nothing is built yet)")
            t, image = timed(lambda: build_image(site=str(site_path)))
            print(f"[bench] first build_image: {t:.1f}s -> {image.pinned}", flush=True)
            result["first_build_seconds"] = t
            result["image"] = image.pinned
            if args.builds:
                result["unchanged_build"] = unchanged_builds(site_path, image, args.builds)
            engine = engine_for("buildah", site.paths.containers, [registry])
            # olab's registry asks for its login: a pull (when this machine lacks the image) needs it.
            engine.ensure_local(image.pinned, registry_login(site.paths.containers))
            result["labs"] = labs_section(site, site_path, image, engine, args.runs)
    finally:
        stop_local_registry(store)
        stop_api_socket(store)
    path = write_results("oci.json", result)
    if "unchanged_build" in result:
        b = result["unchanged_build"]
        print(f"\n[bench] unchanged build_image: median {b['median']:.3f}s (goal <= {GOAL_BUILD_SECONDS}s)")
    labs = result["labs"]
    rows = [["", "median s", "min s", "max s", "x nbmake"]]
    for name in LAB_RUNS:
        values = labs["seconds"][name]
        rows.append([name, f"{median(values):.2f}", f"{min(values):.2f}", f"{max(values):.2f}",
                     f"{labs['ratio_to_nbmake'][name]:.2f}"])
    rows.append(["olab rerun, nothing changed", f"{labs['rerun_median']:.2f}", f"{min(labs['rerun_seconds']):.2f}",
                 f"{max(labs['rerun_seconds']):.2f}", f"{labs['rerun_over_nbmake']:.3f}"])
    print("\n" + fmt_table(rows))
    goals = labs["goals"]
    print(f"\n[bench] olab / nbmake = {labs['ratio_to_nbmake']['olab']:.2f}x (goal <= {GOAL_LABS_VS_NBMAKE}x: "
          f"{'met' if goals['olab_over_nbmake']['met'] else 'MISSED'}); by round {labs['olab_over_nbmake_by_round']}")
    print(f"[bench] rerun / nbmake = {labs['rerun_over_nbmake']:.3f}x (goal <= {GOAL_RERUN_VS_NBMAKE}x: "
          f"{'met' if goals['rerun_over_nbmake']['met'] else 'MISSED'}); rerun / olab first run = {labs['rerun_over_olab']:.3f}x")
    print(f"[bench] 1-minute load at each round's start and at the end: {labs['load_1min_at_round_starts_and_end']}")
    print(f"[bench] results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
