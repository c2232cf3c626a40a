"""The local target's JupyterHub: a process on this machine, its files and its settings.

The hub runs from olab's own Python as a background server whose log lives in
the site's runtime folder; its pid is this target's own record
(``hub/olab-hub-process.json``), not part of what other targets know of a hub.
What the hub should be (a ``HubSpec``) is rendered here into the settings
document that ``templates/jupyterhub_config.py`` reads.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from core.config import Site
from core.files import atomic_write, content_hash, write_json
from core.logs import task_logger
from core.models import HubDeployment, HubPlan, HubSpec
from core.runner import ServerDidNotStart, ToolMissing, http_answers, pid_alive, start_server, stop_process
from tasks.hub_api import HubError

PROCESS_RECORD = "olab-hub-process.json"


class LocalHubProcess(BaseModel):
    pid: int
    config_hash: str
    started_at: datetime | None = None


def proxy_command() -> list[str]:
    """The Python configurable-http-proxy, with room for a class's requests (tasks/proxy.py)."""
    import importlib.util

    if importlib.util.find_spec("configurable_http_proxy") is None:
        raise ToolMissing("configurable-http-proxy is not installed: pip install configurable-http-proxy (it comes with `pip install -e .`)")
    from tasks import proxy

    return proxy.command()


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def hub_log(site: Site) -> Path:
    return site.paths.logs / "hub.log"


# podman's default bridge (10.88.0.0/16; its gateway is the host's address on it).
BRIDGE_NETWORK = "podman"


def hub_template() -> str:
    return resources.files("tasks").joinpath("templates/jupyterhub_config.py").read_text()


def render_settings(
    site: Site,
    spec: HubSpec,
    *,
    proxy_command: list[str],
    run_as_root: bool,
    docker_socket: Path | None = None,
    gateway: str | None = None,
) -> dict:
    """The local hub's settings document (no secrets: only the store's path).

    A venv image runs users' servers as local processes; an OCI image runs
    each as a container of that digest, through a Docker-compatible API.
    """
    paths = site.paths
    hub = site.config.hub
    image = spec.image
    if spec.authenticator not in ("native", "shared-password"):
        raise HubError(
            f"{site.source}: hub.authenticator: {spec.authenticator} is not available on the local target; "
            "use native (students sign up, an admin approves them) or shared-password (one person, a demo)"
        )
    spawner: dict = {"spawner": "process"}
    if image.is_oci:
        if docker_socket is None or gateway is None:
            raise ValueError("an OCI image needs a container API socket and a bridge network to spawn users")
        spawner = {
            "spawner": "docker",
            # Each user's container on this bridge, in its own network namespace; the hub's
            # API listens on the bridge's gateway, the only host address the containers reach.
            "network": BRIDGE_NETWORK,
            "gateway": gateway,
            "docker_url": f"unix://{docker_socket}",
            "container_prefix": f"olab-{site.name}",
            "container_uid": 1000,
            "mem_limit": spec.limits.memory,
            "cpu_limit": spec.limits.cpu,
        }
    elif spec.limits.memory or spec.limits.cpu:
        raise HubError(
            f"{site.source}: hub.memory_limit/cpu_limit: a venv image runs user servers as plain processes, "
            "which the local target cannot limit; build an OCI image (./setup.sh as root) or remove the limits"
        )
    single = spec.admins[0] if spec.authenticator == "shared-password" or spawner["spawner"] == "process" else None
    return {
        **spawner,
        "single_user": single,
        "authenticator": spec.authenticator,
        "site": site.name,
        "host": hub.host,
        "port": hub.port,
        "hub_api_port": hub.hub_api_port,
        "proxy_api_port": hub.proxy_api_port,
        "admins": list(spec.admins),
        "default_url": spec.default_url,
        "start_timeout": spec.start_timeout_seconds,
        "db_file": str(paths.hub / "jupyterhub.sqlite"),
        "pid_file": str(paths.hub / "jupyterhub.pid"),
        "proxy_pid_file": str(paths.hub / "proxy.pid"),
        "secrets_file": str(paths.secrets),
        "homes": str(paths.homes),
        "labs": str(paths.labs),
        "proxy_command": proxy_command,
        "singleuser": str(image.bin / "jupyterhub-singleuser"),
        "singleuser_args": ["--allow-root"] if run_as_root else [],
        "image": image.pinned,
        "user_environment": {
            "PATH": f"{image.bin}:/usr/local/bin:/usr/bin:/bin",
            "OLAB_SITE": site.name,
        },
        "cull": (
            {
                "command": [sys.executable, "-m", "jupyterhub_idle_culler"],
                "timeout": spec.cull_idle_seconds,
                "every": max(5, min(300, spec.cull_idle_seconds // 2)),
            }
            if spec.cull_idle_seconds
            else None
        ),
    }


def config_hash(settings: dict, template: str, labs_hash: str) -> str:
    return content_hash(
        [
            ("settings", json.dumps(settings, sort_keys=True).encode()),
            ("template", template.encode()),
            ("labs", labs_hash.encode()),
        ]
    )


def write_hub_files(site: Site, settings: dict, template: str) -> Path:
    hub_dir = site.paths.hub
    hub_dir.mkdir(parents=True, exist_ok=True)
    write_json(hub_dir / "olab-hub.json", settings)
    config = hub_dir / "jupyterhub_config.py"
    atomic_write(config, template)
    return config


def _record(site: Site) -> Path:
    return site.paths.hub / PROCESS_RECORD


def running_process(site: Site) -> LocalHubProcess | None:
    """The site's hub process if it is alive (from this target's record, or the
    pid that state files written before it kept)."""
    found: LocalHubProcess | None = None
    try:
        found = LocalHubProcess.model_validate_json(_record(site).read_text())
    except (OSError, ValueError):
        try:
            legacy = json.loads(site.paths.state.read_text()).get("hub") or {}
            if legacy.get("pid"):
                found = LocalHubProcess(pid=legacy["pid"], config_hash=legacy.get("config_hash", ""))
        except (OSError, ValueError):
            pass
    return found if found is not None and pid_alive(found.pid) else None


@task(name="apply-hub", cache_policy=NO_CACHE)
def apply_hub(site: Site, spec: HubSpec, plan: HubPlan, settings: dict, template: str) -> HubDeployment:
    """Start, restart or leave the hub, as planned."""
    logger = task_logger()
    current = running_process(site)
    started_at = datetime.now(UTC)
    if plan.action == "unchanged" and current is not None:
        logger.info("hub %s already runs this configuration (pid %d); nothing to do", plan.url, current.pid)
        return HubDeployment(
            url=plan.url, config_hash=plan.config_hash, image=spec.image,
            started_at=current.started_at or started_at, action="unchanged",
        )
    if current is not None:
        logger.info("configuration changed; stopping hub pid %d", current.pid)
        stop_process(current.pid)
    hub = site.config.hub
    for port in (hub.port, hub.hub_api_port, hub.proxy_api_port):
        if port_in_use(hub.host, port):
            raise HubError(f"port {port} on {hub.host} is already in use; stop what holds it or pick other ports in {site.source}")
    config = write_hub_files(site, settings, template)
    if settings.get("single_user"):
        why = ("hub.authenticator shared-password is the single-user demo mode" if spec.authenticator == "shared-password"
               else "a venv image runs every server as the hub's own account, so students would share files and secrets")
        logger.warning("this hub lets one person log in, %s: %s (for a class: an OCI image and hub.authenticator native)",
                       settings["single_user"], why)
    site.paths.homes.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "PREFECT_"))}
    logger.info("hub starting, log: %s", hub_log(site))
    try:
        pid = start_server(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            cwd=site.paths.hub,
            log_file=hub_log(site),
            env=env,
            ready=lambda: http_answers(f"{site.hub_url}/hub/api/"),
            timeout=hub.start_timeout_seconds,
            what="the hub",
            poll=0.25,
        )
    except ServerDidNotStart as exc:
        raise HubError(str(exc)) from None
    write_json(_record(site), LocalHubProcess(pid=pid, config_hash=plan.config_hash, started_at=started_at).model_dump(mode="json"))
    logger.info("hub ready at %s (pid %d)", site.hub_url, pid)
    return HubDeployment(url=site.hub_url, config_hash=plan.config_hash, image=spec.image, started_at=started_at, action=plan.action)


def stop_hub(site: Site) -> int | None:
    """Stop the hub and, through its own cleanup, every user server; data stays.
    Returns the pid it stopped, if one ran."""
    current = running_process(site)
    _record(site).unlink(missing_ok=True)
    if current is None:
        return None
    stop_process(current.pid, grace_seconds=30)
    return current.pid
