"""test-notebooks wall time against a named baseline: `pytest --nbmake -n 2`.

    pip install -e '.[bench]'
    python bench/bench_notebooks.py [--runs 3]

One run of this script measures, on the same labs and the same lock file:

- baseline: ``pytest --nbmake -n 2`` (nbmake + pytest-xdist) over the labs staged
  as .ipynb, in a separate venv made from images/olab-user/requirements.lock plus
  nbmake and pytest-xdist (the content-addressed olab environment is not touched);
- olab first run: the ``test-notebooks`` flow with the lab result cache cleared;
- olab rerun: the same flow again with nothing changed (cache warm).

Goals: first run / nbmake <= 1.0x, rerun / first run <= 0.1x.
Results go to bench/results/notebooks.json. A run in which a lab waited out a
whole cell timeout (an upstream nbclient stall, see bench/README.md) is flagged,
and stall-free medians are reported beside the medians of all runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (sets OLAB_HOME, OLAB_PROJECT, Prefect analytics off)
from benchlib import BENCH_ROOT, banner, clear_lab_cache, fmt_table, median, timed  # noqa: E402

GOAL_FIRST_VS_NBMAKE = 1.0
GOAL_RERUN_VS_FIRST = 0.1
EXTRA_PACKAGES = ["nbmake", "pytest-xdist"]
# A lab that ran this share of the cell timeout or longer waited out a stall (the labs take seconds).
STALL_FRACTION = 0.8


def make_baseline_venv(folder: Path) -> Path:
    """A venv with the user environment's lock plus nbmake and pytest-xdist (uv, like olab's builder)."""
    from tasks.python_env import uv_binary

    uv = uv_binary()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    python = folder / "bin" / "python"
    lock = benchlib.snapshot_inputs()[0] / "requirements.lock"
    for argv in (
        [uv, "venv", "--quiet", "--python", sys.executable, str(folder)],
        [uv, "pip", "sync", "--quiet", "--python", str(python), str(lock)],
        [uv, "pip", "install", "--quiet", "--python", str(python), *EXTRA_PACKAGES],
    ):
        subprocess.run(argv, env=env, check=True)
    return python


def frozen(python: Path) -> dict[str, str]:
    from tasks.python_env import uv_binary

    out = subprocess.run(
        [uv_binary(), "pip", "freeze", "--python", str(python)], check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split("==", 1) for line in out.splitlines() if "==" in line)


def lab_env(python: Path, home: Path) -> dict[str, str]:
    """The same environment olab's run_labs gives its lab runner (private Jupyter home, agg backend)."""
    from tasks.notebooks import private_lab_env

    home.mkdir(parents=True, exist_ok=True)
    return private_lab_env(python.parent, home)


DURATION = re.compile(r"^\s*([0-9.]+)s call\s+(\S+?)\.ipynb::")


def run_nbmake(python: Path, notebooks: list[Path], cell_timeout: int, home: Path) -> dict[str, float]:
    """One baseline run; returns each lab's execution seconds (from pytest --durations)."""
    argv = [
        str(python), "-m", "pytest", "--nbmake", f"--nbmake-timeout={cell_timeout}",
        "-n", "2", "-q", "-p", "no:cacheprovider", "--durations=0", "--durations-min=0", *map(str, notebooks),
    ]  # fmt: skip
    # cwd: the staging folder (no pytest config of this repository applies).
    out = subprocess.run(argv, cwd=notebooks[0].parent, env=lab_env(python, home), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"baseline failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
    return {m.group(2): float(m.group(1)) for line in out.stdout.splitlines() if (m := DURATION.match(line))}


def stalled(per_lab: dict[str, float], cell_timeout: int) -> list[str]:
    """Labs that sat out a whole cell timeout (see README: a missed execute_reply wake-up)."""
    return sorted(lab for lab, seconds in per_lab.items() if seconds >= STALL_FRACTION * cell_timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each (median reported)")
    benchlib.add_heartbeat_option(parser, "notebooks")
    args = parser.parse_args()
    engine_heartbeat = args.prefect_heartbeat
    logging.getLogger("olab").setLevel(logging.INFO)

    from flows.build_image import build_image
    from flows.test_notebooks import test_notebooks
    from core.config import load_site
    from tasks.notebooks import discover_labs, stage_lab

    with benchlib.prefect_server(), benchlib.flow_heartbeats(engine_heartbeat):
        site_path = benchlib.write_site("bench-nb")
        site = load_site(str(site_path))
        cell_timeout = site.config.labs.cell_timeout_seconds

        banner("building the user environment (build-image flow, once)")
        build_seconds, image = timed(lambda: build_image(site=str(site_path)))
        print(f"[bench] {image.pinned} at {image.location} ({build_seconds:.1f}s)")

        banner("baseline venv: same lock + " + " ".join(EXTRA_PACKAGES))
        venv_seconds, python = timed(lambda: make_baseline_venv(BENCH_ROOT / "nbmake-venv"))
        ours, theirs = frozen(image.python), frozen(python)
        differing = sorted(n for n in ours if theirs.get(n) != ours[n])
        added = sorted(f"{n}=={v}" for n, v in theirs.items() if n not in ours)
        if differing:
            raise SystemExit(f"the baseline venv does not match the lock for: {', '.join(differing)}")
        print(f"[bench] baseline venv in {venv_seconds:.1f}s; same {len(ours)} locked packages, plus {', '.join(added)}")

        labs = discover_labs(site.labs_dir)
        staging = BENCH_ROOT / "nbmake-labs"
        notebooks = [stage_lab(lab, staging) for lab in labs]
        print(f"[bench] labs: {', '.join(lab.name for lab in labs)}")

        def baseline() -> tuple[float, dict[str, float]]:
            return timed(lambda: run_nbmake(python, notebooks, cell_timeout, BENCH_ROOT / "nbmake-home"))

        def olab_first() -> tuple[float, object]:
            clear_lab_cache()
            seconds, report = timed(lambda: test_notebooks(site=str(site_path)))
            assert report.passed and not any(r.cached for r in report.results), "a first run must run every lab"
            return seconds, report

        def olab_rerun() -> float:
            seconds, report = timed(lambda: test_notebooks(site=str(site_path)))
            assert report.passed and all(r.cached for r in report.results), "a rerun must reuse every lab"
            return seconds

        # One untimed run of each first: a fresh venv compiles its .pyc files and
        # fills the page cache on first use; both environments get the same warm-up.
        banner("warm-up (not measured): one nbmake run, one olab first run")
        warm = {"nbmake": baseline()[0], "olab_first": olab_first()[0]}
        print(f"[bench] warm-up: nbmake {warm['nbmake']:.1f}s, olab first run {warm['olab_first']:.1f}s")

        nbmake_runs: list[float] = []
        first_runs: list[float] = []
        nbmake_labs: list[dict[str, float]] = []
        first_labs: list[dict[str, float]] = []
        for i in range(args.runs):
            banner(f"round {i + 1}/{args.runs}: nbmake, then olab first run (cache cleared)")
            seconds, labs_seconds = baseline()
            nbmake_runs.append(seconds)
            nbmake_labs.append(labs_seconds)
            seconds, report = olab_first()
            first_runs.append(seconds)
            first_labs.append({r.lab: round(r.seconds, 2) for r in report.results})
            print(
                f"[bench] nbmake {nbmake_runs[-1]:.2f}s (stalled: {stalled(nbmake_labs[-1], cell_timeout) or 'none'}), "
                f"olab first run {first_runs[-1]:.2f}s (stalled: {stalled(first_labs[-1], cell_timeout) or 'none'})"
            )
        rerun_runs: list[float] = []
        for i in range(args.runs):
            banner(f"olab rerun {i + 1}/{args.runs} (nothing changed)")
            rerun_runs.append(olab_rerun())
            print(f"[bench] olab rerun {rerun_runs[-1]:.2f}s")

    nb, first, rerun = median(nbmake_runs), median(first_runs), median(rerun_runs)
    ratio_first, ratio_rerun = first / nb, rerun / first
    nb_clean = [s for s, labs_s in zip(nbmake_runs, nbmake_labs) if not stalled(labs_s, cell_timeout)]
    first_clean = [s for s, labs_s in zip(first_runs, first_labs) if not stalled(labs_s, cell_timeout)]
    rows = [["", "median s", "min s", "max s", "runs", "stalled runs", "median s, stall-free"]]
    for name, runs, clean in (
        ("nbmake baseline (pytest --nbmake -n 2)", nbmake_runs, nb_clean),
        ("olab test-notebooks, first run", first_runs, first_clean),
        ("olab test-notebooks, rerun (cached)", rerun_runs, rerun_runs),
    ):
        rows.append([
            name, f"{median(runs):.2f}", f"{min(runs):.2f}", f"{max(runs):.2f}", str(len(runs)),
            str(len(runs) - len(clean)), f"{median(clean):.2f}" if clean else "n/a",
        ])  # fmt: skip
    print("\n" + fmt_table(rows))
    print(
        f"\nfirst run / nbmake   = {ratio_first:.2f}x  (goal <= {GOAL_FIRST_VS_NBMAKE:.1f}x: "
        f"{'met' if ratio_first <= GOAL_FIRST_VS_NBMAKE else 'MISSED'})"
    )
    print(
        f"rerun / first run    = {ratio_rerun:.3f}x (goal <= {GOAL_RERUN_VS_FIRST:.1f}x: "
        f"{'met' if ratio_rerun <= GOAL_RERUN_VS_FIRST else 'MISSED'})"
    )
    clean_ratios = {}
    if nb_clean and first_clean:
        clean_ratios = {
            "first_over_nbmake": round(median(first_clean) / median(nb_clean), 3),
            "rerun_over_first": round(rerun / median(first_clean), 4),
        }
        print(
            f"stall-free runs only: first run / nbmake = {clean_ratios['first_over_nbmake']:.2f}x, "
            f"rerun / first run = {clean_ratios['rerun_over_first']:.3f}x"
        )
    path = benchlib.write_results(
        benchlib.results_name("notebooks", engine_heartbeat),
        {
            "benchmark": "test-notebooks vs pytest --nbmake -n 2",
            "labs": [lab.name for lab in labs],
            "image": image.pinned,
            "baseline": {
                "command": "pytest --nbmake --nbmake-timeout=%d -n 2 LABS.ipynb" % cell_timeout,
                "environment": "uv venv from images/olab-user/requirements.lock + " + ", ".join(added),
            },
            "olab_parallelism": site.config.labs.parallelism or os.cpu_count(),
            "prefect_server": "prefect.testing.utilities.prefect_test_harness, started before timing",
            "flow_run_heartbeat": benchlib.heartbeat_note(engine_heartbeat),
            "setup_seconds": {"build_image": round(build_seconds, 2), "baseline_venv": round(venv_seconds, 2)},
            "warmup_seconds": {k: round(v, 2) for k, v in warm.items()},
            "seconds": {
                "nbmake": [round(s, 3) for s in nbmake_runs],
                "olab_first": [round(s, 3) for s in first_runs],
                "olab_rerun": [round(s, 3) for s in rerun_runs],
            },
            "median_seconds": {"nbmake": round(nb, 3), "olab_first": round(first, 3), "olab_rerun": round(rerun, 3)},
            "per_lab_seconds": {"nbmake": nbmake_labs, "olab_first": first_labs},
            "stalled_labs": {
                "threshold_seconds": STALL_FRACTION * cell_timeout,
                "nbmake": [stalled(x, cell_timeout) for x in nbmake_labs],
                "olab_first": [stalled(x, cell_timeout) for x in first_labs],
            },
            "median_seconds_stall_free": {
                "nbmake": round(median(nb_clean), 3) if nb_clean else None,
                "olab_first": round(median(first_clean), 3) if first_clean else None,
            },
            "ratios_stall_free": clean_ratios or None,
            "ratios": {
                "first_over_nbmake": round(ratio_first, 3),
                "rerun_over_first": round(ratio_rerun, 4),
            },
            "goals": {
                "first_over_nbmake": {"max": GOAL_FIRST_VS_NBMAKE, "met": ratio_first <= GOAL_FIRST_VS_NBMAKE},
                "rerun_over_first": {"max": GOAL_RERUN_VS_FIRST, "met": ratio_rerun <= GOAL_RERUN_VS_FIRST},
            },
        },
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
