"""This machine, as the local target's "cluster": the site's runtime folder, ports and tools."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.config import Site
from core.models import Check, DataFacts
from core.restore_points import HUB_PATHS
from core.runner import ToolMissing
from core.secrets import SecretStore
from tasks.backup import flush_filesystem, parallel, scan
from tasks.local_hub import port_in_use, proxy_command, running_process
from tasks.oci import engine_for, insecure_registries, resolve_builder
from tasks.python_env import uv_binary
from tasks.local_registry import ensure_local_registry

STAGING_SUFFIX = ".restoring"
DELETING_SUFFIX = ".deleting"


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


@task(name="prepare-local-host", cache_policy=NO_CACHE)
def prepare_local_host(site: Site, *, dry_run: bool = False) -> list[Check]:
    """Create the site's folders and secret store, start its registry; check ports and tools.
    With dry_run, only check: what is missing is reported as what would be created."""
    paths = site.paths
    checks: list[Check] = []
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
    removed on several threads: unlinking is kernel work that overlaps."""
    jobs = []
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            jobs += [(lambda g=g: shutil.rmtree(g) if g.is_dir() and not g.is_symlink() else g.unlink())
                     for g in child.iterdir()]
    parallel(jobs, 2 * (os.cpu_count() or 2))
    shutil.rmtree(root)


def _beside(runtime: Path, suffix: str) -> Path:
    return runtime.with_name(runtime.name + suffix)


def staging_dir(site: Site) -> Path:
    """Where a restore unpacks, beside the runtime (same filesystem, so the swap is a rename)."""
    return _beside(site.paths.runtime, STAGING_SUFFIX)


def delete_runtime(site: Site) -> None:
    runtime = site.paths.runtime
    doomed = _beside(runtime, DELETING_SUFFIX)
    if runtime.exists():
        # Rename first, so a half-deleted runtime is never mistaken for a live one.
        if doomed.exists():
            remove_tree(doomed)
        os.replace(runtime, doomed)
    if doomed.exists():
        remove_tree(doomed)


def swap_in(site: Site) -> None:
    """Replace whatever runtime there is with the verified staging folder, durably."""
    delete_runtime(site)
    os.replace(staging_dir(site), site.paths.runtime)
    flush_filesystem(site.paths.runtime)
