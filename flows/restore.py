"""restore: the Monday morning restore from the newest complete restore point.

Every archive is unpacked into a staging folder and every file checked against
the manifest; only a fully verified staging folder replaces the runtime. The
restore point itself is only ever read. Then the hub is redeployed with the
same image digest and checked.
"""

from __future__ import annotations

import os
import shutil
import time

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel

from flows._common import artifact_key, open_site
from flows.deploy_hub import deploy_hub
from flows.teardown import HUB_PATHS, delete_runtime
from olab.state import mark_path, read_mark, write_mark
from olab.config import Site
from olab.faults import checkpoint
from olab.guard import site_guard
from olab.logs import progress, task_logger
from olab.models import HubDeployment, ImageRef
from olab.restore_points import choose_restore_point
from tasks.backup import (
    VerificationFailed,
    extract_and_verify,
    flush_filesystem,
    list_restore_points,
    parallel,
    read_manifest,
)


class UserRestore(BaseModel):
    user: str
    files: int
    bytes: int
    verified: bool


class RestoreReport(BaseModel):
    site: str
    restore_point: str | None
    users: list[UserRestore]
    hub: HubDeployment | None
    seconds: float
    note: str = ""


def staging_dir(site: Site):
    return site.paths.runtime.with_name(site.paths.runtime.name + ".restoring")


@task(name="unpack-and-verify", cache_policy=NO_CACHE)
def unpack_and_verify(site: Site, restore_point: str) -> list[UserRestore]:
    """Unpack the restore point into staging; every file checked (in parallel)."""
    point = site.paths.backups / restore_point
    manifest = read_manifest(point)
    staging = staging_dir(site)
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "homes").mkdir(parents=True)
    # The hub's state unpacks into a folder of its own: no member of it can reach a home
    # (or a link in one); only the hub's own top-level names are then moved into place.
    hub_folder = staging / ".hub-unpack"
    jobs = [
        (lambda u=u: extract_and_verify(point / "users" / u.archive, u, staging / "homes" / u.name, f"user {u.name}"))
        for u in manifest.users
    ]
    jobs.append(lambda: extract_and_verify(point / manifest.hub.archive, manifest.hub, hub_folder, "hub state"))
    try:
        parallel(jobs, os.cpu_count() or 2, progress(task_logger(), "unpacked and verified (homes + hub state)"))
        allowed = {p.split("/")[0] for p in HUB_PATHS}
        for entry in sorted(hub_folder.iterdir()):
            if entry.name not in allowed or entry.is_symlink():
                raise VerificationFailed(f"hub state: {entry.name}: not part of the hub's state")
            os.replace(entry, staging / entry.name)
        hub_folder.rmdir()
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [UserRestore(user=u.name, files=sum(f.type == "file" for f in u.files), bytes=u.bytes, verified=True) for u in manifest.users]


def swap_in(site: Site) -> None:
    """Replace whatever runtime there is with the verified staging folder."""
    delete_runtime(site)
    os.replace(staging_dir(site), site.paths.runtime)
    flush_filesystem(site.paths.runtime)


@flow(name="restore")
def restore(site: str = "local", restore_point: str | None = None) -> RestoreReport:
    """Bring a torn-down site back, bit for bit, and redeploy its hub."""
    the_site = open_site(site)
    logger = get_run_logger()
    started = time.monotonic()
    with site_guard(the_site):
        mark = read_mark(the_site)
        runtime = the_site.paths.runtime
        if mark is None:
            if restore_point:
                raise RuntimeError(
                    f"site {the_site.name} is not torn down; restoring {restore_point} over a live site is refused"
                )
            if not runtime.exists():
                raise RuntimeError(f"site {the_site.name} is not torn down and has no runtime: nothing to restore")
            # A restore that finished its swap before it was stopped: make sure the hub runs.
            logger.info("site %s is not torn down; making sure its hub is deployed", the_site.name)
            hub = deploy_hub(site=site)
            return RestoreReport(site=the_site.name, restore_point=None, users=[], hub=hub,
                                 seconds=time.monotonic() - started, note="site was not torn down; hub ensured")
        points = list_restore_points(the_site.paths.backups)
        chosen = choose_restore_point(points, restore_point)
        if mark.phase == "deleting":
            # The teardown did not finish deleting: finish it before restoring over it.
            delete_runtime(the_site)
        logger.info("restoring %s", chosen.id)
        write_mark(the_site, "restoring", chosen.id)
        checkpoint("restore", "mark")
        users = unpack_and_verify(the_site, chosen.id)
        logger.info("restore point %s unpacked and verified: %d users", chosen.id, len(users))
        checkpoint("restore", "unpack")
        swap_in(the_site)
        checkpoint("restore", "swap")
        manifest = read_manifest(chosen.path)
        image = ImageRef.model_validate(manifest.image_ref) if manifest.image_ref else None
        mark_path(the_site).unlink()
        checkpoint("restore", "unmark")
        hub = deploy_hub(site=site, image=image)
        checkpoint("restore", "deploy")
        create_table_artifact(
            key=artifact_key(the_site, "restore"),
            description=f"restore of {the_site.name} from {chosen.id}; hub {hub.url}",
            table=[u.model_dump() for u in users] or [{"user": "(none)", "files": 0, "bytes": 0, "verified": True}],
        )
        return RestoreReport(site=the_site.name, restore_point=chosen.id, users=users, hub=hub,
                             seconds=time.monotonic() - started)
