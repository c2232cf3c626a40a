"""This machine, as the local target's "cluster": folders, ports and tools."""

from __future__ import annotations

import os
import shutil
import sys

from prefect import task
from prefect.cache_policies import NO_CACHE

from olab.config import Site
from olab.models import Check, HubDeployment
from olab.runner import ToolMissing
from olab.secrets import SecretStore
from tasks.jupyterhub import is_running, port_in_use, proxy_command
from tasks.oci import engine_for, insecure_registries, resolve_builder
from tasks.python_env import uv_binary
from tasks.registry import ensure_local_registry


def _tool(name: str, find) -> Check:
    try:
        return Check(name=f"tool {name}", ok=True, detail=str(find()))
    except ToolMissing as exc:
        return Check(name=f"tool {name}", ok=False, detail=str(exc))


@task(name="prepare-local-host", cache_policy=NO_CACHE)
def prepare_local_host(site: Site, hub: HubDeployment | None) -> list[Check]:
    """Create the site's folders and secret store; check ports and tools."""
    paths = site.paths
    checks: list[Check] = []
    folders = {
        "runtime": paths.runtime,
        "hub": paths.hub,
        "homes": paths.homes,
        "labs": paths.labs,
        "logs": paths.logs,
        "backups": paths.backups,
        "environments": paths.envs,
    }
    for label, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
        checks.append(Check(name=f"folder {label}", ok=writable, detail=str(folder) + ("" if writable else " is not writable")))
    SecretStore(paths.secrets).load_or_create()
    checks.append(Check(name="secret store", ok=True, detail=f"{paths.secrets} (mode 0600)"))
    ok_python = sys.version_info >= (3, 11)
    checks.append(Check(name="python", ok=ok_python, detail=sys.version.split()[0] + ("" if ok_python else ": olab needs 3.11+")))
    checks.append(_tool("uv", uv_binary))
    checks.append(_tool("configurable-http-proxy", lambda: proxy_command()[0]))
    ours = is_running(hub)
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
        if builder != "venv":
            engine = engine_for(builder, paths.containers, insecure_registries(site))
            if site.config.image.local_registry:
                ensure_local_registry(paths.containers, site.config.image.registry)
                checks.append(Check(name="registry", ok=True, detail=f"{site.config.image.registry} (run by olab)"))
            checks.append(Check(name="container api", ok=True, detail=str(engine.ensure_api_socket())))
    except ToolMissing as exc:
        checks.append(Check(name="image builder", ok=False, detail=str(exc)))
    free = shutil.disk_usage(paths.runtime).free
    checks.append(Check(name="disk", ok=free > 2 << 30, detail=f"{free / 2**30:.1f} GiB free at {paths.runtime}"))
    return checks
