"""teardown and restore of 100 users x 10 MiB against plain GNU tar of the same data.

    pip install -e '.[bench]'
    python bench/bench_backup.py [--users 100] [--runs 3]

One run of this script:

- sets up a local site (``image.builder: venv``; ``build_image`` once, then
  ``deploy_hub(check=False)``) and writes ``--users`` homes straight into
  ``site.paths.homes/<user>/``: per user one 5 MiB file, three 1 MiB files and
  about 2 MiB of small files (1-64 KiB) spread over a few folders, plus an empty
  folder and a symlink; random bytes from a seeded RNG (incompressible);
- baseline teardown: ``tar -cf base.tar -C homes .`` (GNU tar, one process) onto
  the same filesystem as the site's backups; baseline restore: ``tar -xf`` into an
  empty folder. Nothing is dropped from the page cache, for either side; before
  every timed step ``sync`` writes back what the previous step left dirty. A second,
  diagnostic teardown baseline adds ``sync base.tar`` (olab fsyncs every archive);
- olab, data part only (what tar does, plus olab's hashing, fsync and verification):
  teardown = ``write_restore_point.fn`` + ``verify_restore_point.fn`` on a stopped
  hub; restore = ``unpack_and_verify.fn`` (unpack to staging, check every file);
- olab, whole flows: ``teardown`` (stops the hub, archives, verifies, deletes the
  runtime) and ``restore`` (unpacks and verifies, swaps in, redeploys the hub and
  runs its health check, which tar does not do);
- baseline and olab alternate, ``--runs`` rounds, medians; goal: olab / tar <= 1.5x.

Results go to bench/results/backup.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (sets OLAB_HOME, OLAB_PROJECT, Prefect analytics off)
from benchlib import BENCH_ROOT, banner, fmt_table, median, timed, write_results, write_site  # noqa: E402

GOAL_RATIO = 1.5
MIB, KIB = 1 << 20, 1 << 10
PER_USER = 10 * MIB
SEED = 20261130


def write_user(home: Path, rng: random.Random) -> tuple[int, int]:
    """One user's 10 MiB: a big file, a few medium ones, many small ones in folders."""
    files = 0
    left = PER_USER

    def put(path: Path, size: int) -> None:
        nonlocal files, left
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        files += 1
        left -= size

    put(home / "work" / "big-run.h5", 5 * MIB)
    for i in range(3):
        put(home / "work" / "data" / f"frame{i}.npy", MIB)
    folders = ["work/analysis", "work/plots", "labs/output", ".local/share/jupyter", "notes"]
    n = 0
    while left > 64 * KIB:
        size = rng.randint(1 * KIB, 64 * KIB)
        put(home / folders[n % len(folders)] / f"f{n:03d}.bin", size)
        n += 1
    put(home / "notes" / "last.bin", left)
    (home / "work" / "empty dir").mkdir(parents=True, exist_ok=True)
    os.symlink("data/frame0.npy", home / "work" / "latest")
    return files, PER_USER


def write_homes(homes: Path, users: int) -> dict:
    rng = random.Random(SEED)
    total_files = total_bytes = 0
    for i in range(users):
        f, b = write_user(homes / f"student{i:03d}", rng)
        total_files, total_bytes = total_files + f, total_bytes + b
    return {"users": users, "files": total_files, "bytes": total_bytes}


def settle() -> None:
    """Before every timed step: write back what earlier steps left dirty (and let ext4's
    discards of removed files pass), so no step pays for the one before it. Caches stay.
    (With a 1 s wait, single rounds on this VM still swung by up to 2x; 2 s steadied them.)"""
    os.sync()
    time.sleep(2.0)


def tar_create(homes: Path, out: Path) -> float:
    out.unlink(missing_ok=True)
    settle()
    started = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out), "-C", str(homes), "."], check=True)
    return time.perf_counter() - started


def tar_create_synced(homes: Path, out: Path) -> float:
    """Diagnostic baseline: tar -cf, then fsync the archive (`sync FILE`), as olab fsyncs each archive."""
    out.unlink(missing_ok=True)
    settle()
    started = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out), "-C", str(homes), "."], check=True)
    subprocess.run(["sync", str(out)], check=True)
    return time.perf_counter() - started


def tar_extract(archive: Path, dest: Path) -> float:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    settle()
    started = time.perf_counter()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)
    seconds = time.perf_counter() - started
    shutil.rmtree(dest)
    return seconds


def olab_data_teardown(site) -> tuple[float, float, str]:
    """write_restore_point + verify_restore_point (the hub is stopped): (write s, verify s, point id)."""
    from flows.teardown import user_homes, verify_restore_point, write_restore_point
    from olab.restore_points import restore_point_id

    users = user_homes(site)
    point_id = restore_point_id(datetime.now(UTC), secrets.token_hex(3))
    settle()
    t_write, manifest = timed(lambda: write_restore_point.fn(site, point_id, users))
    t_verify, _ = timed(lambda: verify_restore_point.fn(site, manifest))
    return t_write, t_verify, point_id


def olab_data_restore(site, point_id: str) -> float:
    from flows.restore import staging_dir, unpack_and_verify

    settle()
    seconds, users = timed(lambda: unpack_and_verify.fn(site, point_id))
    assert all(u.verified for u in users)
    shutil.rmtree(staging_dir(site))
    return seconds


def students_scan(site) -> tuple[int, int, int]:
    from tasks.backup import scan

    counts = [scan(home) for home in sorted(site.paths.homes.glob("student*"))]
    return len(counts), sum(f for f, _ in counts), sum(b for _, b in counts)


def drop_restore_points(site) -> None:
    for point in site.paths.backups.glob("rp-*"):
        shutil.rmtree(point)


def stop_site(site) -> None:
    from olab.state import load_state
    from tasks.jupyterhub import stop_hub

    try:
        stop_hub(load_state(site).hub)
    except FileNotFoundError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("prefect").setLevel(logging.WARNING)

    from olab.config import load_site
    from olab.state import load_state

    site_path = write_site("bk", backups={"keep": 10})
    site = load_site(str(site_path))
    base_dir = site.paths.backups.parent / "baseline"  # beside the backups: the same filesystem
    base_dir.mkdir(parents=True, exist_ok=True)
    base_tar, base_x = base_dir / "base.tar", base_dir / "extracted"
    rounds = []
    result: dict = {"tar": subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout.splitlines()[0]}
    try:
        with benchlib.prefect_server():
            from flows.build_image import build_image
            from flows.deploy_hub import deploy_hub
            from flows.restore import restore
            from flows.teardown import teardown

            banner("setup: build the venv image, deploy the hub, write the homes (not measured)")
            image = build_image(site=str(site_path))
            deploy_hub(site=str(site_path), image=image, check=False)
            t, data = timed(lambda: write_homes(site.paths.homes, args.users))
            print(f"[bench] wrote {data['users']} homes, {data['files']} files, {data['bytes'] / MIB:.0f} MiB in {t:.1f}s", flush=True)
            result["data"] = data
            expected = students_scan(site)

            for r in range(args.runs):
                banner(f"round {r + 1} of {args.runs}")
                row: dict = {"load_before": os.getloadavg()[0]}
                row["hub_stop"], _ = timed(lambda: stop_site(site))
                row["tar_create_synced"] = tar_create_synced(site.paths.homes, base_tar)
                row["tar_create"] = tar_create(site.paths.homes, base_tar)
                row["olab_write"], row["olab_verify"], point = olab_data_teardown(site)
                row["olab_data_teardown"] = row["olab_write"] + row["olab_verify"]
                row["tar_extract"] = tar_extract(base_tar, base_x)
                row["olab_data_restore"] = olab_data_restore(site, point)
                drop_restore_points(site)
                deploy_hub(site=str(site_path), image=image, check=False)  # a live hub for the teardown flow
                settle()
                row["olab_teardown_flow"], report = timed(lambda: teardown(site=str(site_path)))
                assert not site.paths.runtime.exists() and report.restore_point
                settle()
                row["olab_restore_flow"], restored = timed(lambda: restore(site=str(site_path)))
                assert restored.restore_point == report.restore_point and len(restored.users) == args.users
                health = load_state(site).health
                row["restore_health_check"] = sum(c.seconds for c in health.checks) if health else 0.0
                assert students_scan(site) == expected, "the restored homes differ from what was written"
                drop_restore_points(site)
                # The health check made its test user a home: drop it, so every round archives the same data.
                for home in site.paths.homes.iterdir():
                    if not home.name.startswith("student"):
                        shutil.rmtree(home)
                row["load_after"] = os.getloadavg()[0]
                rounds.append(row)
                print(
                    "[bench] "
                    + ", ".join(f"{k} {v:.2f}" + ("" if k.startswith("load") else "s") for k, v in row.items()),
                    flush=True,
                )
    finally:
        stop_site(site)
        benchlib.stop_site_hub(site_path)

    def med(key: str) -> float:
        return median([r[key] for r in rounds])

    tc, tx = med("tar_create"), med("tar_extract")
    comparisons = {
        "teardown data part (write + verify) / tar -cf": (med("olab_data_teardown"), tc),
        "teardown data part / (tar -cf + sync FILE)": (med("olab_data_teardown"), med("tar_create_synced")),
        "teardown flow (stop hub ... delete runtime) / tar -cf": (med("olab_teardown_flow"), tc),
        "restore data part (unpack_and_verify) / tar -xf": (med("olab_data_restore"), tx),
        "restore flow (incl. redeploy + health check) / tar -xf": (med("olab_restore_flow"), tx),
        "restore flow minus its health check / tar -xf": (
            median([r["olab_restore_flow"] - r["restore_health_check"] for r in rounds]), tx),
    }
    result.update(
        {
            "rounds": rounds,
            "medians": {k: med(k) for k in rounds[0] if not k.startswith("load")},
            "ratios": {k: {"olab": o, "tar": b, "ratio": o / b, "goal": GOAL_RATIO} for k, (o, b) in comparisons.items()},
        }
    )
    path = write_results("backup.json", result)
    table = [["comparison", "olab s", "tar s", "ratio", "goal"]]
    table += [[k, f"{o:.2f}", f"{b:.2f}", f"{o / b:.2f}x", f"<= {GOAL_RATIO}x"] for k, (o, b) in comparisons.items()]
    print("\n" + fmt_table(table))
    print(f"(olab write {med('olab_write'):.2f}s + verify {med('olab_verify'):.2f}s)")
    print(f"[bench] results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
