"""teardown: the weekend shutdown that loses nothing.

Stop every user server and the hub, write a restore point (an archive per user
home plus the hub's database, secrets and state, with a manifest), read it
back to verify it, and only then delete the site's runtime. Killed at any
point and run again, it converges: an unfinished restore point is never used,
and a deletion that was under way is finished from the mark it left.
"""

from __future__ import annotations

import os
import secrets as _random
import shutil
import time
from datetime import UTC, datetime

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel

from flows._common import artifact_key, open_site
from olab.config import Site
from olab.faults import checkpoint
from olab.guard import site_guard
from olab.logs import progress, task_logger
from olab.restore_points import HUB_ARCHIVE, ArchiveEntry, Manifest, plan_prune, restore_point_id
from olab.secrets import SecretStore
from olab.state import load_state, read_mark, write_mark
from tasks.backup import (
    check_writable,
    list_restore_points,
    mark_complete,
    parallel,
    remove_tree,
    scan,
    sync_folder,
    verify_archive,
    write_archive,
    write_manifest,
)
from tasks.jupyterhub import HubAPI, is_running, stop_hub

# What of the runtime is the hub's state: everything else is rebuilt by deploy.
HUB_PATHS = ["hub/jupyterhub.sqlite", "secrets", "state.json"]


class TeardownReport(BaseModel):
    site: str
    restore_point: str | None
    users: list[str]
    files: int
    bytes: int
    seconds: float
    dry_run: bool = False
    already_torn_down: bool = False
    pruned: list[str] = []


def user_homes(site: Site) -> list[str]:
    homes = site.paths.homes
    return sorted(p.name for p in homes.iterdir() if p.is_dir() and not p.is_symlink()) if homes.is_dir() else []


@task(name="stop-user-servers", cache_policy=NO_CACHE)
def stop_user_servers(site: Site) -> list[str]:
    """Through the hub's REST API; waits until each server is down."""
    store = SecretStore(site.paths.secrets)
    with HubAPI(site, store.load()) as api:
        running = [u["name"] for u in api.users() if u.get("servers")]
        for name in running:
            api.stop_server(name, timeout=float(site.config.hub.start_timeout_seconds))
    return running


@task(name="write-restore-point", cache_policy=NO_CACHE)
def write_restore_point(site: Site, point_id: str, users: list[str]) -> Manifest:
    """Archive every home (in parallel) and the hub's state; manifest last."""
    paths = site.paths
    point = paths.backups / point_id
    (point / "users").mkdir(parents=True, exist_ok=True)
    os.chmod(point, 0o700)
    jobs = [
        (lambda name=name: write_archive(paths.homes / name, point / "users" / f"{name}.tar", name))
        for name in users
    ]
    jobs.append(lambda: write_archive(paths.runtime, point / f"{HUB_ARCHIVE}.tar", HUB_ARCHIVE, include=HUB_PATHS))
    archives: list[ArchiveEntry] = parallel(jobs, os.cpu_count() or 2, progress(task_logger(), "archived (homes + hub state)"))
    state = load_state(site)
    # The image the hub last ran; else the last one built.
    image = state.hub.image if state.hub else state.image
    hub_archive = archives.pop()
    manifest = Manifest(
        id=point_id,
        site=site.name,
        created=datetime.now(UTC),
        image=image.pinned if image else None,
        image_ref=image.model_dump(mode="json") if image else None,
        hub_config_hash=state.hub.config_hash if state.hub else None,
        users=archives,
        hub=hub_archive,
    )
    write_manifest(point, manifest)
    return manifest


@task(name="verify-restore-point", cache_policy=NO_CACHE)
def verify_restore_point(site: Site, manifest: Manifest) -> None:
    point = site.paths.backups / manifest.id
    jobs = [
        (lambda u=u: verify_archive(point / "users" / u.archive, u, f"user {u.name}", durable=True))
        for u in manifest.users
    ]
    jobs.append(lambda: verify_archive(point / manifest.hub.archive, manifest.hub, "hub state", durable=True))
    parallel(jobs, os.cpu_count() or 2, progress(task_logger(), "verified archives"))
    # The archives are on disk (fsynced as they checked out); now their names.
    sync_folder(point / "users")
    mark_complete(point)


def delete_runtime(site: Site) -> None:
    runtime = site.paths.runtime
    if runtime.exists():
        # Rename first, so a half-deleted runtime is never mistaken for a live one.
        doomed = runtime.with_name(runtime.name + ".deleting")
        if doomed.exists():
            remove_tree(doomed)
        os.replace(runtime, doomed)
        remove_tree(doomed)
    leftover = runtime.with_name(runtime.name + ".deleting")
    if leftover.exists():
        remove_tree(leftover)


def prune(site: Site, protect: set[str]) -> list[str]:
    doomed = plan_prune(list_restore_points(site.paths.backups), site.config.backups.keep, protect)
    for point in doomed:
        shutil.rmtree(point.path)
    return [p.id for p in doomed]


def _report_artifact(site: Site, report: TeardownReport) -> None:
    verb = "would" if report.dry_run else "did"
    create_markdown_artifact(
        key=artifact_key(site, "teardown"),
        description=f"teardown on {site.name}",
        markdown="\n".join(
            [
                f"# teardown: {site.name}" + (" (dry run)" if report.dry_run else ""),
                "",
                f"- restore point: `{report.restore_point}`",
                f"- users ({len(report.users)}): {', '.join(report.users) or 'none'}",
                f"- files: {report.files}, bytes: {report.bytes}",
                f"- runtime {verb} get deleted: `{site.paths.runtime}`",
                f"- pruned restore points: {', '.join(report.pruned) or 'none'}",
                f"- seconds: {report.seconds:.1f}",
            ]
        ),
    )


@flow(name="teardown")
def teardown(site: str = "local", dry_run: bool = False) -> TeardownReport:
    """Stop the site and keep everything in a verified restore point."""
    the_site = open_site(site)
    logger = get_run_logger()
    started = time.monotonic()
    with site_guard(the_site):
        paths = the_site.paths
        mark = read_mark(the_site)
        if mark and mark.phase in ("deleting", "torn-down") and not dry_run:
            # A teardown already wrote a verified restore point; finish its deletion only.
            logger.info("restore point %s is complete; finishing the teardown it began", mark.restore_point)
            delete_runtime(the_site)
            write_mark(the_site, "torn-down", mark.restore_point)
            report = TeardownReport(
                site=the_site.name, restore_point=mark.restore_point, users=[], files=0, bytes=0,
                seconds=time.monotonic() - started, already_torn_down=mark.phase == "torn-down",
            )
            _report_artifact(the_site, report)
            return report
        if not paths.runtime.exists():
            raise RuntimeError(f"site {the_site.name} has no runtime at {paths.runtime}: nothing to tear down")
        users = user_homes(the_site)
        files, size = 0, 0
        for name in users:
            f, b = scan(paths.homes / name)
            files, size = files + f, size + b
        f, b = scan(paths.runtime, HUB_PATHS)
        files, size = files + f, size + b
        hub = load_state(the_site).hub
        hub_up = is_running(hub)
        if dry_run:
            running = []
            if hub_up:
                with HubAPI(the_site, SecretStore(paths.secrets).load()) as api:
                    running = [u["name"] for u in api.users() if u.get("servers")]
            logger.info("would stop servers of: %s", ", ".join(running) or "nobody")
            logger.info("would stop the hub%s", f" (pid {hub.pid})" if hub_up else " (not running)")
            logger.info("would back up %d users, %d files, %d bytes to %s", len(users), files, size, paths.backups)
            logger.info("would delete %s", paths.runtime)
            report = TeardownReport(site=the_site.name, restore_point=None, users=users, files=files, bytes=size,
                                    seconds=time.monotonic() - started, dry_run=True)
            _report_artifact(the_site, report)
            return report
        # Before anything is stopped: the restore point must be writable in full.
        check_writable(paths.backups, size)
        checkpoint("teardown", "preflight")
        if hub_up:
            stopped = stop_user_servers(the_site)
            logger.info("stopped user servers: %s", ", ".join(stopped) or "none were running")
            checkpoint("teardown", "stop-servers")
            stop_hub(hub)
            logger.info("hub stopped")
        checkpoint("teardown", "stop-hub")
        point_id = restore_point_id(datetime.now(UTC), _random.token_hex(3))
        manifest = write_restore_point(the_site, point_id, users)
        checkpoint("teardown", "archive")
        verify_restore_point(the_site, manifest)
        logger.info("restore point %s verified: %d files, %d bytes", point_id, manifest.total_files, manifest.total_bytes)
        checkpoint("teardown", "verify")
        write_mark(the_site, "deleting", point_id)
        checkpoint("teardown", "mark")
        delete_runtime(the_site)
        write_mark(the_site, "torn-down", point_id)
        checkpoint("teardown", "delete")
        pruned = prune(the_site, protect={point_id})
        report = TeardownReport(
            site=the_site.name, restore_point=point_id, users=users, files=manifest.total_files,
            bytes=manifest.total_bytes, seconds=time.monotonic() - started, pruned=pruned,
        )
        _report_artifact(the_site, report)
        return report
