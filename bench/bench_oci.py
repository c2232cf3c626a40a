"""OCI path: unchanged-image build time, and labs inside the image against `pytest --nbmake -n 2`.

    OLAB_HOME=/tmp/olab-bench-oci-home python bench/bench_oci.py [--runs 3] [--builds 5]

Needs buildah, podman, runc, docker-registry and debootstrap (./setup.sh); the
script exits with a message where any is missing. Set OLAB_HOME to a folder that
is kept to reuse the built images across runs (the first build of the debootstrap
base and the user image takes minutes and is not measured).

One run measures:

- ``build_image`` with unchanged inputs (the registry already has the content-hash
  tag), ``--builds`` times; goal: <= 1 s each (median reported), with a breakdown
  of the steps of ``flows.build_image._build_oci`` timed outside the flow and the
  cost of an empty Prefect flow;
- ``test-notebooks`` in the image with the lab result cache cleared, against the
  baseline ``pytest --nbmake -n 2`` run in ONE container of a derived image
  (``FROM <pinned image>`` + ``pip install nbmake pytest-xdist``) on the same labs
  staged as .ipynb; alternating, ``--runs`` rounds, median; goal: olab / nbmake <= 1.0x.

Results go to bench/results/oci.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (sets OLAB_HOME, OLAB_PROJECT, Prefect analytics off)
from benchlib import BENCH_ROOT, banner, clear_lab_cache, free_port, median, timed, write_results, write_site  # noqa: E402

NEEDED = ("buildah", "podman", "runc", "docker-registry", "debootstrap")
GOAL_BUILD_SECONDS = 1.0
GOAL_LABS_VS_NBMAKE = 1.0
EXTRA_PACKAGES = ["nbmake", "pytest-xdist"]


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--builds", type=int, default=5)
    args = parser.parse_args()
    if benchlib.tools_missing(NEEDED):
        return 0
    logging.getLogger("prefect").setLevel(logging.WARNING)

    from core.config import load_site, olab_home
    from tasks.notebooks import discover_labs, stage_lab
    from tasks.oci import engine_for, stop_api_socket
    from tasks.local_registry import stop_local_registry

    registry = f"127.0.0.1:{free_port()}"
    site_path = write_site("oci", image={"builder": "buildah", "base_image": "debootstrap:bookworm", "registry": registry})
    site = load_site(str(site_path))
    store = olab_home() / "containers"
    result: dict = {"registry": registry, "olab_home": str(olab_home())}
    try:
        with benchlib.prefect_server():
            from flows.build_image import build_image
            from flows.test_notebooks import test_notebooks

            banner("first build (not measured; minutes when nothing is built yet)")
            t, image = timed(lambda: build_image(site=str(site_path)))
            print(f"[bench] first build_image: {t:.1f}s -> {image.pinned}", flush=True)
            result["first_build_seconds"] = t
            result["image"] = image.pinned

            banner(f"build_image with unchanged inputs, {args.builds} times")
            builds = []
            for i in range(args.builds):
                t, again = timed(lambda: build_image(site=str(site_path)))
                assert again == image, "unchanged inputs must give the same image"
                builds.append(t)
                print(f"[bench] unchanged build {i + 1}: {t:.3f}s", flush=True)
            # Diagnostic: the same, with Prefect's flow-run heartbeat thread off (its exit join
            # waits for the thread's current 1 s sleep: prefect/flow_engine.py _send_heartbeats).
            from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

            no_heartbeat = []
            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                for i in range(args.builds):
                    t, again = timed(lambda: build_image(site=str(site_path)))
                    assert again == image
                    no_heartbeat.append(t)
                empty_no_heartbeat = empty_flow_seconds()
            print(f"[bench] unchanged build, heartbeats off: median {median(no_heartbeat):.3f}s {[round(x, 3) for x in no_heartbeat]}")
            breakdown = build_breakdown(site_path)
            empty = empty_flow_seconds()
            for name, seconds in breakdown.items():
                print(f"[bench]   {name}: {seconds * 1000:.0f} ms")
            print(f"[bench]   empty Prefect flow: {empty * 1000:.0f} ms ({empty_no_heartbeat * 1000:.0f} ms with heartbeats off)")
            result["unchanged_build"] = {
                "seconds": builds,
                "median": median(builds),
                "goal_seconds": GOAL_BUILD_SECONDS,
                "steps_outside_flow_seconds": breakdown,
                "steps_total_seconds": sum(breakdown.values()),
                "empty_prefect_flow_seconds": empty,
                "heartbeats_off_seconds": no_heartbeat,
                "heartbeats_off_median": median(no_heartbeat),
                "empty_prefect_flow_heartbeats_off_seconds": empty_no_heartbeat,
            }

            banner("derived nbmake image (not measured)")
            engine = engine_for("buildah", site.paths.containers, [registry])
            engine.ensure_local(image.pinned)
            derived = derived_image(engine, image.pinned, BENCH_ROOT)
            print(f"[bench] baseline image: {derived}", flush=True)
            labs = discover_labs(site.labs_dir)
            staged = Path(tempfile.mkdtemp(prefix="nbmake-labs-", dir=BENCH_ROOT))
            os.chmod(staged, 0o755)
            names = [stage_lab(lab, staged).name for lab in labs]
            timeout = site.config.labs.cell_timeout_seconds
            # One unmeasured run of each, so neither pays a first-start cost the other does not.
            run_nbmake(engine, derived, staged, names, timeout)
            clear_lab_cache()
            test_notebooks(site=str(site_path), image=image)

            banner(f"labs: olab test-notebooks (cache cleared) vs pytest --nbmake -n 2 in the image, {args.runs} rounds")
            nb, ol = [], []
            for r in range(args.runs):
                t_nb = run_nbmake(engine, derived, staged, names, timeout)
                clear_lab_cache()
                t_ol, report = timed(lambda: test_notebooks(site=str(site_path), image=image))
                assert report.passed and not any(x.cached for x in report.results)
                nb.append(t_nb)
                ol.append(t_ol)
                per_lab = ", ".join(f"{x.lab} {x.seconds:.1f}s" for x in report.results)
                print(f"[bench] round {r + 1}: nbmake {t_nb:.2f}s, olab {t_ol:.2f}s ({per_lab})", flush=True)
            result["labs"] = {
                "labs": names,
                "baseline": f"podman run {derived} pytest --nbmake -n 2 (one container)",
                "nbmake_seconds": nb,
                "olab_seconds": ol,
                "nbmake_median": median(nb),
                "olab_median": median(ol),
                "ratio": median(ol) / median(nb),
                "goal_ratio": GOAL_LABS_VS_NBMAKE,
            }
    finally:
        stop_local_registry(store)
        stop_api_socket(store)
    path = write_results("oci.json", result)
    b, l = result["unchanged_build"], result["labs"]
    print(f"\n[bench] unchanged build_image: median {b['median']:.3f}s (goal <= {GOAL_BUILD_SECONDS}s)")
    print(f"[bench] labs: olab {l['olab_median']:.2f}s vs nbmake {l['nbmake_median']:.2f}s = {l['ratio']:.2f}x (goal <= {GOAL_LABS_VS_NBMAKE}x)")
    print(f"[bench] results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
