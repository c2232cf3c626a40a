"""teardown and restore of 100 users x 10 MiB against plain GNU tar of the same data.

    pip install -e '.[bench]'
    python bench/bench_backup.py [--users 100] [--runs 5] [--flow-runs 2]

One run of this script:

- sets up a local site (``image.builder: venv``; ``build_image`` once, then
  ``deploy_hub(check=False)``) and writes ``--users`` homes straight into
  ``site.paths.homes/<user>/``: per user one 5 MiB file, three 1 MiB files and
  about 2 MiB of small files (1-64 KiB) spread over a few folders, plus an empty
  folder and a symlink; random bytes from a seeded RNG (incompressible);
- data rounds (``--runs``), the hub stopped: baseline teardown ``tar -cf
  base.tar -C homes .`` (GNU tar, one process) onto the same filesystem as the
  site's backups, and, diagnostic, the same plus ``sync base.tar`` (olab fsyncs
  every archive); olab teardown = ``write_restore_point.fn`` +
  ``verify_restore_point.fn``; baseline restore ``tar -xf`` into a new folder;
  olab restore = ``unpack_and_verify.fn`` (verify, unpack to staging, check every
  file). Nothing is deleted during these rounds: what a step leaves is renamed
  into a trash folder (see "Recently deleted inodes" below);
- flow rounds (``--flow-runs``): the whole ``teardown`` flow on a live hub (stops
  it, archives, verifies, deletes the runtime) and the whole ``restore`` flow
  (unpacks and verifies, swaps in, redeploys the hub and runs its health check,
  which tar does not do);
- nothing is dropped from the page cache, for either side; before every timed
  step ``settle`` writes back what the previous step left dirty and frees the
  same 1.5 GiB of just-used page cache for the step to write into (see there);
- baseline and olab alternate; medians; goal: olab / tar <= 1.5x.

Recently deleted inodes: this machine's root filesystem is ext4 without a
journal. There, for 60 to 300 s after files are deleted, creating files makes the
inode allocator skip and re-read every recently deleted inode (``perf``: 60 % of
``tar -xf``'s time in ``recently_deleted``/``find_get_block_common``), so one
``tar -xf`` of this data took 0.9 s or 7.5 s depending on what was deleted in the
minutes before. The data rounds therefore delete nothing until they are done.
The flow rounds cannot avoid it: the restore flow runs right after a teardown
that deleted 7,000 inodes (a Monday restore after a Friday teardown would not).

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


BALLAST_MIB = 1536  # more than any timed step writes (1000 MiB)
BALLAST = BENCH_ROOT / "ballast.bin"


def settle() -> None:
    """Before every timed step, the same starting point for tar and olab.

    - ``sync``, then 2 s: nothing left dirty by the step before is written back
      during this one, and ext4's discards of removed files pass. Caches stay.
    - Release the ballast: a 1.5 GiB file written (untimed) before the wait is
      deleted, so the step writes into page cache pages this VM has just used.
      Pages the guest has not touched for a while cost 2-15x more to write into
      (measured: 1 GiB into a new file took 0.17 s or 1.0-2.6 s of system time,
      depending only on that). Without the ballast, ``tar -cf`` (which deletes
      the previous ``base.tar`` first) always got recycled pages and olab never did.
    """
    block = os.urandom(MIB)
    fd = os.open(BALLAST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(BALLAST_MIB):
            os.write(fd, block)
    finally:
        os.close(fd)
    os.sync()
    time.sleep(2.0)
    BALLAST.unlink()


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


def tar_extract(archive: Path, dest: Path, trash: Path) -> float:
    """tar -xf into a new folder, which then goes to the trash (deleted after the data rounds)."""
    dest.mkdir(parents=True)
    settle()
    started = time.perf_counter()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)
    seconds = time.perf_counter() - started
    os.replace(dest, trash / dest.name)
    return seconds


def olab_data_teardown(site) -> tuple[float, float, str]:
    """write_restore_point + verify_restore_point (the hub is stopped): (write s, verify s, point id).

    Called as the teardown flow calls them through ``LocalPlatform.save_user_data``
    and ``verify_user_data``, with the tasks' plain functions.
    """
    from core.restore_points import restore_point_id
    from core.sealing import ensure_site_key
    from core.state import load_state
    from tasks.backup import verify_restore_point, write_restore_point
    from tasks.host import user_homes

    users = user_homes(site)
    point_id = restore_point_id(datetime.now(UTC), secrets.token_hex(3))
    point = site.paths.backups / point_id
    key, _ = ensure_site_key(site)  # as LocalPlatform.check_backup_room, before the timing

    def write():
        state = load_state(site)
        # The image the hub last ran; else the last one built (as LocalPlatform.save_user_data).
        image = state.hub.image if state.hub else state.image
        config_hash = state.hub.config_hash if state.hub else None
        return write_restore_point.fn(key, site.paths.runtime, point, users, image, config_hash)

    settle()
    t_write, manifest = timed(write)
    t_verify, _ = timed(lambda: verify_restore_point.fn(point, manifest, key))
    return t_write, t_verify, point_id


def olab_data_restore(site, point_id: str, trash_as: Path) -> float:
    """unpack_and_verify into the site's staging folder, which then goes to the trash."""
    from core.sealing import site_key
    from tasks.backup import unpack_and_verify
    from tasks.host import staging_dir

    key = site_key(site)
    settle()
    seconds, users = timed(lambda: unpack_and_verify.fn(site.paths.backups / point_id, staging_dir(site), key))
    assert all(u.verified for u in users)
    os.replace(staging_dir(site), trash_as)
    return seconds


def students_scan(site) -> tuple[int, int, int]:
    from tasks.backup import scan

    counts = [scan(home) for home in sorted(site.paths.homes.glob("student*"))]
    return len(counts), sum(f for f, _ in counts), sum(b for _, b in counts)


def drop_restore_points(site) -> None:
    for point in site.paths.backups.glob("rp-*"):
        shutil.rmtree(point)


def stop_site(site) -> None:
    from tasks.local_hub import stop_hub

    stop_hub(site)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5, help="data rounds")
    parser.add_argument("--flow-runs", type=int, default=2, help="whole-flow rounds")
    args = parser.parse_args()
    logging.getLogger("prefect").setLevel(logging.WARNING)

    from core.config import load_site
    from core.state import load_state

    site_path = write_site("bk", backups={"keep": 10})
    site = load_site(str(site_path))
    base_dir = site.paths.backups.parent / "baseline"  # beside the backups: the same filesystem
    base_dir.mkdir(parents=True, exist_ok=True)
    base_tar = base_dir / "base.tar"
    trash = base_dir / "trash"  # same filesystem: renames, no deletions, during the data rounds
    trash.mkdir()
    rounds: list[dict] = []
    flow_rounds: list[dict] = []
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

            stop_site(site)
            for r in range(args.runs):
                banner(f"data round {r + 1} of {args.runs}")
                row: dict = {"load_before": os.getloadavg()[0]}
                row["tar_create_synced"] = tar_create_synced(site.paths.homes, base_tar)
                row["tar_create"] = tar_create(site.paths.homes, base_tar)
                row["olab_write"], row["olab_verify"], point = olab_data_teardown(site)
                row["olab_data_teardown"] = row["olab_write"] + row["olab_verify"]
                row["tar_extract"] = tar_extract(base_tar, base_dir / f"extracted-{r}", trash)
                row["olab_data_restore"] = olab_data_restore(site, point, trash / f"staging-{r}")
                os.replace(site.paths.backups / point, trash / point)
                row["load_after"] = os.getloadavg()[0]
                rounds.append(row)
                print("[bench] " + ", ".join(f"{k} {v:.2f}" + ("" if k.startswith("load") else "s") for k, v in row.items()), flush=True)
            banner("deleting what the data rounds left (not measured)")
            shutil.rmtree(trash)
            for r in range(args.flow_runs):
                banner(f"flow round {r + 1} of {args.flow_runs}")
                row = {"load_before": os.getloadavg()[0]}
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
                flow_rounds.append(row)
                print("[bench] " + ", ".join(f"{k} {v:.2f}" + ("" if k.startswith("load") else "s") for k, v in row.items()), flush=True)
    finally:
        stop_site(site)
        benchlib.stop_site_hub(site_path)

    def med(key: str, of: list[dict] = rounds) -> float:
        return median([r[key] for r in of])

    tc, tx = med("tar_create"), med("tar_extract")
    comparisons = {
        "teardown data part (write + verify) / tar -cf": (med("olab_data_teardown"), tc),
        "teardown data part / (tar -cf + sync FILE)": (med("olab_data_teardown"), med("tar_create_synced")),
        "restore data part (unpack_and_verify) / tar -xf": (med("olab_data_restore"), tx),
    }
    if flow_rounds:
        comparisons |= {
            "teardown flow (stop hub ... delete runtime) / tar -cf": (med("olab_teardown_flow", flow_rounds), tc),
            "restore flow (incl. redeploy + health check) / tar -xf": (med("olab_restore_flow", flow_rounds), tx),
            "restore flow minus its health check / tar -xf": (
                median([r["olab_restore_flow"] - r["restore_health_check"] for r in flow_rounds]), tx),
        }
    medians = {k: med(k) for k in rounds[0] if not k.startswith("load")}
    if flow_rounds:
        medians |= {k: med(k, flow_rounds) for k in flow_rounds[0] if not k.startswith("load")}
    result.update(
        {
            "rounds": rounds,
            "flow_rounds": flow_rounds,
            "medians": medians,
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
