"""This machine, as the local target's "cluster": the site's runtime folder, ports and tools.

olab marks the runtime folders it makes (``.olab-runtime``: the site's name and a
random id, 0600) and deletes only a folder that carries its site's mark.
"""

from __future__ import annotations

import json
import os
import secrets as _random
import shutil
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.config import Site
from core.files import atomic_write
from core.models import Check, DataFacts
from core.restore_points import HUB_PATHS
from core.runner import ToolMissing
from core.secrets import SecretStore
from core.threads import parallel
from tasks.backup import flush_filesystem, scan
from tasks.local_hub import port_in_use, proxy_command, running_process
from tasks.oci import engine_for, insecure_registries, resolve_builder
from tasks.python_env import uv_binary
from tasks.local_registry import ensure_local_registry

STAGING_SUFFIX = ".restoring"
DELETING_SUFFIX = ".deleting"
RUNTIME_MARK = ".olab-runtime"
# What olab itself puts at the top of a local runtime: a folder holding nothing else is olab's.
RUNTIME_NAMES = frozenset({"hub", "homes", "labs", "logs", "secrets", "state.json", RUNTIME_MARK})


class NotOurs(RuntimeError):
    """A runtime (or backups) folder olab must not use or delete; the message is one line saying why."""


def _tool(name: str, find) -> Check:
    try:
        return Check(name=f"tool {name}", ok=True, detail=str(find()))
    except ToolMissing as exc:
        return Check(name=f"tool {name}", ok=False, detail=str(exc))


def _folders(site: Site) -> dict[str, Path]:
    paths = site.paths
    return {
        "runtime": paths.runtime,
        "hub": paths.hub,
        "homes": paths.homes,
        "labs": paths.labs,
        "logs": paths.logs,
        "backups": paths.backups,
        "environments": paths.envs,
    }


def read_runtime_mark(folder: Path) -> str | None:
    """The site named by the folder's mark; None without one. A mark that is not a plain
    file of olab's making counts as another's ("?")."""
    mark = folder / RUNTIME_MARK
    try:
        st = mark.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return "?"
    try:
        site = json.loads(mark.read_text()).get("site")
    except (OSError, ValueError, AttributeError):
        return "?"
    return site if isinstance(site, str) else "?"


def write_runtime_mark(folder: Path, site: Site) -> None:
    record = {"site": site.name, "id": _random.token_hex(16), "created": datetime.now(UTC).isoformat()}
    atomic_write(folder / RUNTIME_MARK, json.dumps(record, indent=2) + "\n", mode=0o600)


def check_runtime_mark(site: Site, folder: Path) -> None:
    """Refuse (NotOurs) a folder that olab did not make for this site: it is not olab's to delete."""
    owner = read_runtime_mark(folder)
    if owner is None:
        raise NotOurs(
            f"runtime folder {folder} has no olab mark ({RUNTIME_MARK}): olab did not make it, so it deletes "
            "nothing of it (a site deployed before olab marked its runtimes gets the mark from its next `olab deploy`)"
        )
    if owner != site.name:
        raise NotOurs(f"runtime folder {folder} is marked as site {owner}'s, not {site.name}'s: olab deletes nothing of it")


def claim_runtime(site: Site, *, dry_run: bool = False) -> str:
    """Make the site's runtime folder olab's: create and mark it, or mark one whose content
    is all olab's (made before runtimes were marked, or by build-image's state record);
    NotOurs for a folder holding anything else. Returns what was (or would be) done."""
    runtime = site.paths.runtime
    if not os.path.lexists(runtime):
        if not dry_run:
            runtime.mkdir(parents=True)
            write_runtime_mark(runtime, site)
        return f"{runtime}: {'would be ' if dry_run else ''}created and marked as site {site.name}'s"
    if runtime.is_symlink() or not runtime.is_dir():
        raise NotOurs(f"runtime folder {runtime} is not a folder (a symlink or a file): olab will not use it")
    owner = read_runtime_mark(runtime)
    if owner == site.name:
        return f"{runtime}: marked as site {site.name}'s"
    if owner is not None:
        raise NotOurs(f"runtime folder {runtime} is marked as site {owner}'s, not {site.name}'s: olab will not use it")
    foreign = sorted(set(os.listdir(runtime)) - RUNTIME_NAMES)
    if foreign:
        raise NotOurs(
            f"runtime folder {runtime} holds {foreign[0]!r}, which olab never puts there, and has no olab mark "
            f"({RUNTIME_MARK}): olab will not run (nor later delete) a site in it; set runtime_dir to a new or empty folder"
        )
    if not dry_run:
        write_runtime_mark(runtime, site)
    return f"{runtime}: {'would be ' if dry_run else ''}marked as site {site.name}'s (it holds only what olab puts there)"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_backup_location(site: Site) -> None:
    """Refuse (NotOurs) backups that teardown would delete with the runtime, or that would hold
    the runtime (and its secrets in clear): the two folders must be apart (symlinks resolved)."""
    backups = site.paths.backups.resolve()
    runtime = site.paths.runtime.resolve()
    for folder, what in ((runtime, "the runtime folder"), (_beside(runtime, STAGING_SUFFIX), "a restore's staging folder"),
                         (_beside(runtime, DELETING_SUFFIX), "a teardown's folder being deleted")):
        if _inside(backups, folder):
            raise NotOurs(f"backups.path {site.paths.backups} lies in {what} {folder}, which olab deletes; put the backups elsewhere")
    if _inside(runtime, backups):
        raise NotOurs(f"backups.path {site.paths.backups} holds the runtime folder {runtime} (and the hub's secrets in it, "
                      "in clear); put the backups elsewhere")


@task(name="prepare-local-host", cache_policy=NO_CACHE)
def prepare_local_host(site: Site, *, dry_run: bool = False) -> list[Check]:
    """Create (and mark) the site's folders and secret store, start its registry; check ports and tools.
    With dry_run, only check: what is missing is reported as what would be created."""
    paths = site.paths
    unmarked = read_runtime_mark(paths.runtime) != site.name
    try:
        check_backup_location(site)
        checks = [Check(name="runtime mark", ok=True, detail=claim_runtime(site, dry_run=dry_run), planned=dry_run and unmarked)]
    except NotOurs as exc:
        # Nothing is made where the runtime or the backups would not be olab's own.
        return [Check(name="runtime folder", ok=False, detail=str(exc))]
    for label, folder in _folders(site).items():
        if dry_run and not folder.exists():
            checks.append(Check(name=f"folder {label}", ok=True, detail=f"{folder}: would be created", planned=True))
            continue
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
        checks.append(Check(name=f"folder {label}", ok=writable, detail=str(folder) + ("" if writable else " is not writable")))
    if dry_run and not paths.secrets.exists():
        checks.append(Check(name="secret store", ok=True, detail=f"{paths.secrets}: would be created (mode 0600)", planned=True))
    else:
        SecretStore(paths.secrets).load_or_create()
        checks.append(Check(name="secret store", ok=True, detail=f"{paths.secrets} (mode 0600)"))
    ok_python = sys.version_info >= (3, 11)
    checks.append(Check(name="python", ok=ok_python, detail=sys.version.split()[0] + ("" if ok_python else ": olab needs 3.11+")))
    checks.append(_tool("uv", uv_binary))
    checks.append(_tool("configurable-http-proxy", lambda: proxy_command()[0]))
    ours = running_process(site) is not None
    cfg = site.config.hub
    for label, port in (("hub", cfg.port), ("hub api", cfg.hub_api_port), ("proxy api", cfg.proxy_api_port)):
        busy = port_in_use(cfg.host, port)
        if busy and ours:
            checks.append(Check(name=f"port {port}", ok=True, detail=f"{label}: held by this site's hub"))
        else:
            checks.append(Check(name=f"port {port}", ok=not busy, detail=f"{label}: " + ("in use by another program" if busy else "free")))
    try:
        builder = resolve_builder(site.config.image.builder)
        checks.append(Check(name="image builder", ok=True, detail=f"{builder} (image.builder: {site.config.image.builder})"))
        if builder != "venv" and not dry_run:
            engine = engine_for(builder, paths.containers, insecure_registries(site))
            if site.config.image.local_registry:
                ensure_local_registry(paths.containers, site.config.image.registry)
                checks.append(Check(name="registry", ok=True, detail=f"{site.config.image.registry} (run by olab)"))
            checks.append(Check(name="container api", ok=True, detail=str(engine.ensure_api_socket())))
        elif builder != "venv":
            checks.append(Check(name="registry", ok=True, detail=f"{site.config.image.registry}: would be started if not running", planned=True))
    except ToolMissing as exc:
        checks.append(Check(name="image builder", ok=False, detail=str(exc)))
    existing = next(p for p in (paths.runtime, *paths.runtime.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    checks.append(Check(name="disk", ok=free > 2 << 30, detail=f"{free / 2**30:.1f} GiB free at {existing}"))
    return checks


def user_homes(site: Site) -> list[str]:
    homes = site.paths.homes
    return sorted(p.name for p in homes.iterdir() if p.is_dir() and not p.is_symlink()) if homes.is_dir() else []


def runtime_facts(site: Site) -> DataFacts:
    """Who has a home in the site's runtime, and how much there is to keep."""
    runtime = site.paths.runtime
    if not runtime.exists():
        return DataFacts(exists=False, where=str(runtime))
    users = user_homes(site)
    files, size = scan(runtime, HUB_PATHS)
    for name in users:
        f, b = scan(site.paths.homes / name)
        files, size = files + f, size + b
    return DataFacts(exists=True, users=users, files=files, bytes=size, where=str(runtime))


def remove_tree(root: Path) -> None:
    """rmtree, with the folders two levels down (a runtime's homes/<user>)
    removed on several threads: unlinking is kernel work that overlaps.
    The runtime mark goes last: a deletion cut short leaves it on what remains."""
    jobs = []
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            jobs += [(lambda g=g: shutil.rmtree(g) if g.is_dir() and not g.is_symlink() else g.unlink())
                     for g in child.iterdir()]
    parallel(jobs, 2 * (os.cpu_count() or 2))
    for child in root.iterdir():
        if child.name == RUNTIME_MARK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (root / RUNTIME_MARK).unlink(missing_ok=True)
    root.rmdir()


def _beside(runtime: Path, suffix: str) -> Path:
    return runtime.with_name(runtime.name + suffix)


def staging_dir(site: Site) -> Path:
    """Where a restore unpacks, beside the runtime (same filesystem, so the swap is a rename)."""
    return _beside(site.paths.runtime, STAGING_SUFFIX)


def delete_runtime(site: Site) -> None:
    """Delete the site's runtime folder, only when it carries the site's mark (NotOurs, and
    nothing deleted, when it does not)."""
    runtime = site.paths.runtime
    doomed = _beside(runtime, DELETING_SUFFIX)
    if runtime.exists():
        check_runtime_mark(site, runtime)
    # What a deletion cut short left: the mark goes last, so an empty folder is olab's too.
    if doomed.exists() and next(doomed.iterdir(), None) is not None:
        check_runtime_mark(site, doomed)
    if runtime.exists():
        # Rename first, so a half-deleted runtime is never mistaken for a live one.
        if doomed.exists():
            remove_tree(doomed)
        os.replace(runtime, doomed)
    if doomed.exists():
        remove_tree(doomed)


def swap_in(site: Site) -> None:
    """Replace whatever runtime there is with the verified staging folder, marked as the
    site's (the mark is not part of a restore point), durably."""
    runtime, staging = site.paths.runtime, staging_dir(site)
    if runtime.exists() and read_runtime_mark(runtime) != site.name:
        raise NotOurs(
            f"runtime folder {runtime} exists without site {site.name}'s mark: something wrote there since the "
            "teardown (olab build's state record, olab serve's log, a person); olab deletes nothing of it: "
            "move it away and run restore again"
        )
    write_runtime_mark(staging, site)
    delete_runtime(site)
    os.replace(staging, runtime)
    flush_filesystem(runtime)
