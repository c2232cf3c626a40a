"""release flow overhead against the same steps as a plain script (no Prefect flows).

    pip install -e '.[bench]'
    python bench/bench_release.py [--rounds 3]

Every side does, from the same starting point (environment already built, lab
result cache cleared, no hub running, a fresh site runtime with free ports):

    environment lookup -> run every lab, 2 at a time -> start the hub as
    deploy-hub does -> health check (the test user's server started, the lab
    rendered by Voila through the API, the browser's look at it, the server stopped)

- plain (the goal's baseline): those steps called directly, one after the other:
  ``venv_tag``/``find_environment``, ``discover_labs``/``stage_lab``, ``run_labs.fn``
  (one lab runner, 2 labs at a time), ``hub_spec`` + ``LocalPlatform.plan_hub``, then the
  steps of ``LocalPlatform.apply_hub`` with ``tasks.local_hub.apply_hub.fn``, then
  ``start_test_server.fn``, ``render_in_voila.fn``, ``flows.deploy_hub._in_browser`` (when
  the site has ``labs.browser_check`` on, as ``check_hub`` does) and ``stop_test_server.fn``;
- overlap: the same, with the render in a thread beside the browser's look, as the flow's
  ``check_hub`` runs them (there a task on the flow's task runner). Flow against it is what
  the orchestration costs with nothing hidden behind parallel work;
- flow: ``flows.release.release(site=...)``.

Then, on the same site with its hub still running, each side runs again with
nothing changed (the unchanged rerun: the image is found, every lab is a cache
hit, the hub is left alone, the health check runs again), timed on its own; the
hub is stopped after it (``tasks.local_hub.stop_hub``, timed as the phase
"stop" but in neither total). The flow side also counts the flow runs each release
made (release and its subflows).

After one untimed warm-up of each, the three run in rotating order (each first once
in 3 rounds), 3 rounds by default; the medians are compared. Goal: flow / plain <= 1.0x
(issue 14; it was 1.2x). Results go to bench/results/release.json.
A failed run is reported (its hub log copied to bench/results/) and not timed; every
hub is stopped by pid whatever fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (sets OLAB_HOME, OLAB_PROJECT, Prefect analytics off)
from benchlib import banner, clear_lab_cache, fmt_table, median, stop_site_hub  # noqa: E402

GOAL_FLOW_VS_PLAIN = 1.0
# A lab that ran this share of the cell timeout or longer waited out a stall (the labs take seconds).
STALL_FRACTION = 0.8


def plain_release(site_path: Path, phases: dict[str, float], labs_seconds: dict[str, float], overlap: bool = False) -> int:
    """The release steps without Prefect flows; returns the hub's pid (the caller stops it).
    ``overlap``: the health check's two renders at once, as the flow runs them."""
    from core.config import load_site
    from core.files import content_hash
    from core.planning import hub_spec, lab_cache_key, plan_labs
    from core.secrets import SecretStore
    from core.state import update_state
    from targets.local import LocalPlatform
    from core.models import Check, HealthReport
    from tasks.hub_api import health_user_login, log_checks, render_in_voila, start_test_server, stop_test_server
    from tasks.local_hub import apply_hub, config_hash, hub_template, proxy_command, render_settings
    from tasks.notebooks import cached_result, discover_labs, run_labs, stage_lab, store_result
    from flows.deploy_hub import _in_browser
    from tasks.python_env import find_environment, venv_tag

    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - mark
        mark = now

    site = load_site(str(site_path))
    paths = site.paths
    # build-image: the environment is already built; find it by its tag.
    tag = venv_tag(site.image_context)
    image = find_environment(paths.envs, site.config.image.name, tag)
    if image is None:
        raise RuntimeError(f"no built environment for {tag[:12]}; the benchmark builds it first")
    update_state(site, image=image)
    phase("environment")

    # test-notebooks: cache lookup, then every lab that has not passed, 2 at a time.
    settings = site.config.labs
    labs = discover_labs(site.labs_dir)
    keys = {lab.name: lab_cache_key(image, lab, settings.cell_timeout_seconds) for lab in labs}
    cached = {name: hit for name, key in keys.items() if (hit := cached_result(paths.lab_cache, key))}
    plan = plan_labs(labs, cached)
    with tempfile.TemporaryDirectory(prefix="olab-labs-") as staging:
        staged = {lab.name: stage_lab(lab, Path(staging)) for lab in plan.to_run}
        fresh = run_labs.fn(image, [staged[lab.name] for lab in plan.to_run], settings.cell_timeout_seconds, 2) if plan.to_run else []
    failed = [r.describe() for r in fresh if not r.passed]
    if failed:
        raise RuntimeError("labs failed: " + "; ".join(failed))
    for result in fresh:
        store_result(paths.lab_cache, keys[result.lab], result)
        labs_seconds[result.lab] = round(result.seconds, 2)
    phase("labs")

    # deploy-hub, as flows/deploy_hub.py does it (without its health check): the hub spec,
    # the local platform's plan, then what LocalPlatform.apply_hub does, with the task's .fn.
    platform = LocalPlatform(site)
    spec = hub_spec(site, image, labs)
    plan = platform.plan_hub(spec)
    SecretStore(paths.secrets).load_or_create()
    for lab in labs:
        stage_lab(lab, paths.labs)
    hub = render_settings(site, spec, proxy_command=proxy_command(), run_as_root=os.geteuid() == 0)
    template = hub_template()
    if config_hash(hub, template, content_hash((l.name, l.content_hash.encode()) for l in labs)) != plan.config_hash:
        raise RuntimeError("the hub's configuration changed between its plan and its apply")
    deployment = apply_hub.fn(site, spec, plan, hub, template)
    update_state(site, hub=deployment)
    phase("deploy")

    # The health check on the live hub, recorded like check_hub does, its steps one after the
    # other: the test user's server started, the lab rendered by Voilà through the API, the
    # browser's look at it when the site has it on (labs.browser_check, on by default), the
    # server stopped. With overlap, the render runs in a thread beside the browser's look, as
    # check_hub runs it (there a task on the flow's task runner).
    access, lab = platform.hub_access(), settings.health_check_lab
    timeout = float(site.config.hub.start_timeout_seconds)
    checks = start_test_server.fn(access, timeout)
    with ThreadPoolExecutor(1) as pool:
        render = pool.submit(render_in_voila.fn, access, lab, timeout) if overlap else None
        rendered = render_in_voila.fn(access, lab, timeout) if render is None else None
        if settings.browser_check:
            with health_user_login(access, timeout) as login:
                look = _in_browser(site)(login)
        else:
            look = Check(name="dashboard in a browser", ok=True, detail="off")
        checks += [rendered or render.result(), look]
    checks.append(stop_test_server.fn(access, timeout))
    log_checks(checks)
    report = HealthReport(hub_url=access.url, checks=checks)
    update_state(site, health=report)
    if not report.ok:
        raise RuntimeError(f"health check failed: {report.checks}")
    phase("health")
    return hub_pid(site)


def hub_pid(site) -> int:
    """The pid of the site's running hub (the local target's own process record)."""
    from tasks.local_hub import running_process

    running = running_process(site)
    if running is None:
        raise RuntimeError(f"site {site.name}: no hub process is running after the deploy")
    return running.pid


def flow_release(site_path: Path, phases: dict[str, float], labs_seconds: dict[str, float], rerun: bool = False) -> int:
    from core.config import load_site
    from flows.release import release

    started = time.perf_counter()
    state = release(site=str(site_path), return_state=True)
    phases["release"] = time.perf_counter() - started
    result = state.result()
    phases["flow_runs"] = flow_runs_of(state.state_details.flow_run_id)
    labs_seconds.update({r.lab: round(r.seconds, 2) for r in result.labs.results})
    if not (result.labs.passed and result.health.ok):
        raise RuntimeError("release: a lab or the health check failed")
    if rerun and not (all(r.cached for r in result.labs.results) and result.hub.action == "unchanged"):
        raise RuntimeError(f"unchanged rerun: labs rerun or the hub was touched ({result.hub.action})")
    if not rerun and any(r.cached for r in result.labs.results):
        raise RuntimeError("release did not run every lab")
    return hub_pid(load_site(str(site_path)))


def flow_runs_of(run_id) -> int:
    """The flow runs a release made: itself and its subflows (build-image only when it builds)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))
    return 1 + len(children)


def measure(kind: str, n: int) -> dict:
    """One run from equal conditions; the hub is stopped in every case, by pid."""
    from core.config import load_site
    from tasks.local_hub import stop_hub as stop_hub_process

    site_path = benchlib.write_site(f"bench-rel-{kind}-{n}")
    clear_lab_cache()
    phases: dict[str, float] = {}
    labs_seconds: dict[str, float] = {}
    pid = None
    started = time.perf_counter()
    error = None
    rerun: dict | None = None
    try:
        if kind == "flow":
            pid = flow_release(site_path, phases, labs_seconds)
        else:
            pid = plain_release(site_path, phases, labs_seconds, overlap=kind == "overlap")
        first = time.perf_counter() - started
        # The unchanged rerun, on the same site and running hub.
        rerun_phases: dict[str, float] = {}
        rerun_started = time.perf_counter()
        if kind == "flow":
            again = flow_release(site_path, rerun_phases, {}, rerun=True)
        else:
            again = plain_release(site_path, rerun_phases, {}, overlap=kind == "overlap")
        rerun = {"seconds": time.perf_counter() - rerun_started, "flow_runs": rerun_phases.pop("flow_runs", None),
                 "phases": {k: round(v, 3) for k, v in rerun_phases.items()}}
        if again != pid:
            raise RuntimeError(f"{kind}: the unchanged rerun restarted the hub (pid {pid} -> {again})")
        stop_started = time.perf_counter()
        if stop_hub_process(load_site(str(site_path))) != pid:
            raise RuntimeError(f"{kind}: the hub (pid {pid}) was not running when it was to be stopped")
        # Not in the total: after two health checks the hub can take up to its 30 s grace to stop.
        phases["stop"] = time.perf_counter() - stop_started
        total = first
    except Exception as exc:  # a failed run is reported, not measured; the benchmark goes on
        total = time.perf_counter() - started
        error = f"{type(exc).__name__}: {exc}"
        print(f"[bench] {kind} run FAILED after {total:.1f}s: {error}", flush=True)
    finally:
        leftovers = stop_site_hub(site_path, pid)
        if leftovers:
            print(f"[bench] {kind}: stopped leftover processes {leftovers}", flush=True)
    if error:
        # Keep the hub's log of a failed run (the site's runtime goes with the temp folder).
        log = load_site(str(site_path)).paths.logs / "hub.log"
        if log.is_file():
            benchlib.RESULTS.mkdir(parents=True, exist_ok=True)
            kept = benchlib.RESULTS / f"release-failed-{site_path.stem}-hub.log"
            shutil.copyfile(log, kept)
            print(f"[bench] hub log of the failed run: {kept}", flush=True)
    cell_timeout = load_site(str(site_path)).config.labs.cell_timeout_seconds
    stalls = sorted(lab for lab, seconds in labs_seconds.items() if seconds >= STALL_FRACTION * cell_timeout)
    return {
        "site": site_path.stem,
        "error": error,
        "flow_runs": phases.pop("flow_runs", None),
        "seconds": total,
        "phases": {k: round(v, 3) for k, v in phases.items()},
        "rerun": rerun,
        "labs_seconds": labs_seconds,
        "stalled_labs": stalls,
    }


KINDS = ("plain", "overlap", "flow")
NAMES = {
    "plain": "plain script (same steps, in order, no flows)",
    "overlap": "plain script, health check's two renders at once",
    "flow": "release flow",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="measured runs of each (median reported)")
    benchlib.add_heartbeat_option(parser, "release")
    args = parser.parse_args()
    engine_heartbeat = args.prefect_heartbeat
    # Task logs outside a flow run go to the stdlib "olab" logger: show them, as Prefect shows its own.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s", "%H:%M:%S"))
    olab_logger = logging.getLogger("olab")
    olab_logger.setLevel(logging.INFO)
    olab_logger.addHandler(handler)
    olab_logger.propagate = False

    from flows.build_image import build_image

    with benchlib.prefect_server(), benchlib.flow_heartbeats(engine_heartbeat):
        banner("building the user environment (build-image flow, once, not measured)")
        setup_site = benchlib.write_site("bench-rel-setup")
        image = build_image(site=str(setup_site))
        print(f"[bench] {image.pinned} at {image.location}")

        banner("warm-up (not measured): one run of each")
        warm = {kind: measure(kind, 0) for kind in KINDS}
        print("[bench] warm-up: " + ", ".join(f"{kind} {run['seconds']:.1f}s" for kind, run in warm.items()))
        for kind, run in warm.items():
            if run["error"]:
                print(f"[bench] warm-up {kind} failed: {run['error']}")

        runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        failed: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for i in range(args.rounds):
            order = KINDS[i % 3:] + KINDS[: i % 3]  # each side first once in 3 rounds
            for kind in order:
                banner(f"round {i + 1}/{args.rounds}: {kind}")
                run = measure(kind, i + 1)
                if run["error"]:
                    failed[kind].append(run)
                    continue
                runs[kind].append(run)
                print(
                    f"[bench] {kind}: {run['seconds']:.2f}s {run['phases']} stalled labs: {run['stalled_labs'] or 'none'}; "
                    f"unchanged rerun {run['rerun']['seconds']:.2f}s {run['rerun']['phases']}"
                    + (f"; flow runs {run['flow_runs']}, rerun {run['rerun']['flow_runs']}" if kind == "flow" else ""),
                    flush=True,
                )

    for kind, bad in failed.items():
        for run in bad:
            print(f"[bench] {kind} run on {run['site']} failed after {run['seconds']:.1f}s: {run['error']}")
    if not all(runs.values()):
        print("[bench] no successful run of one side: no ratio")
        benchlib.write_results(benchlib.results_name("release", engine_heartbeat), {"benchmark": "release flow vs plain script", "failed": failed, "runs": runs})
        return 1
    medians = {kind: median([r["seconds"] for r in runs[kind]]) for kind in KINDS}
    ratio = medians["flow"] / medians["plain"]
    cost = medians["flow"] / medians["overlap"]
    clean = {k: [r["seconds"] for r in v if not r["stalled_labs"]] for k, v in runs.items()}
    rows = [["", "median s", "min s", "max s", "runs ok", "failed", "stalled runs", "median s, stall-free"]]
    for kind in KINDS:
        values = [r["seconds"] for r in runs[kind]]
        rows.append([
            NAMES[kind], f"{median(values):.2f}", f"{min(values):.2f}", f"{max(values):.2f}", str(len(values)),
            str(len(failed[kind])), str(len(values) - len(clean[kind])), f"{median(clean[kind]):.2f}" if clean[kind] else "n/a",
        ])  # fmt: skip
    print("\n" + fmt_table(rows))
    print(f"\nflow / plain = {ratio:.2f}x (goal <= {GOAL_FLOW_VS_PLAIN:.1f}x: {'met' if ratio <= GOAL_FLOW_VS_PLAIN else 'MISSED'})")
    print(f"flow - plain = {medians['flow'] - medians['plain']:+.2f}s")
    print(f"flow / plain with the same overlap = {cost:.2f}x ({medians['flow'] - medians['overlap']:+.2f}s: what the orchestration costs, nothing hidden)")
    clean_ratio = median(clean["flow"]) / median(clean["plain"]) if clean["flow"] and clean["plain"] else None
    if clean_ratio is not None:
        print(f"stall-free runs only: flow / plain = {clean_ratio:.2f}x")

    reruns = {k: [r["rerun"]["seconds"] for r in v] for k, v in runs.items()}
    rerun_medians = {k: median(v) for k, v in reruns.items()}
    rows = [["unchanged rerun", "median s", "min s", "max s", "runs"]]
    for kind in KINDS:
        rows.append([NAMES[kind], f"{rerun_medians[kind]:.2f}", f"{min(reruns[kind]):.2f}", f"{max(reruns[kind]):.2f}", str(len(reruns[kind]))])
    print("\n" + fmt_table(rows))
    rerun_ratio = rerun_medians["flow"] / rerun_medians["plain"]
    rerun_cost = rerun_medians["flow"] / rerun_medians["overlap"]
    print(f"\nunchanged rerun: flow / plain = {rerun_ratio:.2f}x ({rerun_medians['flow'] - rerun_medians['plain']:+.2f}s); "
          f"flow / plain with the same overlap = {rerun_cost:.2f}x ({rerun_medians['flow'] - rerun_medians['overlap']:+.2f}s)")
    flow_runs = sorted({r["flow_runs"] for r in runs["flow"]}), sorted({r["rerun"]["flow_runs"] for r in runs["flow"]})
    print(f"flow runs per release: first run {flow_runs[0]}, unchanged rerun {flow_runs[1]}")

    def phase_medians(kind: str) -> dict[str, float]:
        names = runs[kind][0]["phases"].keys()
        return {n: round(median([r["phases"][n] for r in runs[kind]]), 3) for n in names}

    path = benchlib.write_results(
        benchlib.results_name("release", engine_heartbeat),
        {
            "benchmark": "release flow vs the same steps as a plain script (in order, and with the flow's overlap)",
            "image": image.pinned,
            "sides": NAMES,
            "conditions": "environment built before all; lab result cache cleared, fresh site runtime and ports, "
            "no hub running before each run; then an unchanged rerun on the same site and hub, timed on its own; "
            "then the hub is stopped (phase 'stop', in neither time)",
            "prefect_server": "prefect.testing.utilities.prefect_test_harness, started before timing",
            "flow_run_heartbeat": benchlib.heartbeat_note(engine_heartbeat),
            "warmup_seconds": {k: round(v["seconds"], 2) for k, v in warm.items()},
            "warmup_errors": {k: v["error"] for k, v in warm.items() if v["error"]} or None,
            "seconds": {k: [round(r["seconds"], 3) for r in v] for k, v in runs.items()},
            "phases_seconds": {k: [r["phases"] for r in v] for k, v in runs.items()},
            "median_phases_seconds": {k: phase_medians(k) for k in runs},
            "median_seconds": {k: round(v, 3) for k, v in medians.items()},
            "stalled_labs": {k: [r["stalled_labs"] for r in v] for k, v in runs.items()},
            "labs_seconds": {k: [r["labs_seconds"] for r in v] for k, v in runs.items()},
            "median_seconds_stall_free": {k: round(median(v), 3) if v else None for k, v in clean.items()},
            "ratios_stall_free": {"flow_over_plain": round(clean_ratio, 3)} if clean_ratio else None,
            "ratios": {
                "flow_over_plain": round(ratio, 3),
                "flow_over_plain_with_same_overlap": round(cost, 3),
                "unchanged_rerun_flow_over_plain": round(rerun_ratio, 3),
                "unchanged_rerun_flow_over_plain_with_same_overlap": round(rerun_cost, 3),
            },
            "unchanged_rerun_seconds": {k: [round(v, 3) for v in vs] for k, vs in reruns.items()},
            "unchanged_rerun_median_seconds": {k: round(v, 3) for k, v in rerun_medians.items()},
            "unchanged_rerun_phases_seconds": {k: [r["rerun"]["phases"] for r in v] for k, v in runs.items()},
            "flow_runs_per_release": {"first": [r["flow_runs"] for r in runs["flow"]], "unchanged_rerun": [r["rerun"]["flow_runs"] for r in runs["flow"]]},
            "failed_runs": {k: [{"site": r["site"], "seconds": round(r["seconds"], 1), "error": r["error"]} for r in v] for k, v in failed.items()},
            "difference_seconds": round(medians["flow"] - medians["plain"], 3),
            "goals": {"flow_over_plain": {"max": GOAL_FLOW_VS_PLAIN, "met": ratio <= GOAL_FLOW_VS_PLAIN}},
        },
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
