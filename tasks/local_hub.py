"""The local target's JupyterHub: a process on this machine, its files and its settings.

The hub runs from olab's own Python as a background server whose log lives in
the site's runtime folder; its pid is this target's own record
(``hub/olab-hub-process.json``), not part of what other targets know of a hub.
What the hub should be (a ``HubSpec``) is rendered here into the settings
document that ``templates/jupyterhub_config.py`` reads.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
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

from core import bridges, seen_at_once
from core.config import Site
from core.files import atomic_write, content_hash, write_json
from core.hub_values import lti_admin_hook_code
from core.logs import task_logger
from core.models import HubDeployment, HubPlan, HubSpec
from core.runner import (
    ServerDidNotStart,
    ToolMissing,
    http_answers,
    pid_alive,
    read_pid_file,
    start_server,
    stop_process,
)
from core.secrets import LTI_CLIENT_ID, SecretStore
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


# podman's default bridge (10.88.0.0/16): the hub's API listens on its gateway, a host
# address that each student's container reaches from its own bridge.
BRIDGE_NETWORK = "podman"
# Students' containers run in a user namespace: container uid u is host uid USERNS_BASE + u,
# far above any account a Debian machine hands out (and above the 100000-based ranges of
# /etc/subuid), so the container's root and its jovyan (1000) are nobody on this machine.
USERNS_BASE = 1_700_000_000
USERNS_SIZE = 65536
CONTAINER_UID = 1000


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
    """The local hub's settings document (no secrets: only the store's path; for LTI logins,
    the store must hold the client id).

    A venv image runs users' servers as local processes; an OCI image runs
    each as a container of that digest, through a Docker-compatible API.
    """
    paths = site.paths
    hub = site.config.hub
    image = spec.image
    if spec.authenticator not in ("native", "shared-password", "lti"):
        raise HubError(
            f"{site.source}: hub.authenticator: {spec.authenticator} is not available on the local target; "
            "use native (students sign up, an admin approves them), lti (logins from the course platform) "
            "or shared-password (one person, a demo)"
        )
    if spec.authenticator == "lti" and not image.is_oci:
        raise HubError(
            f"{site.source}: hub.authenticator lti: a venv image runs every student's server as the hub's own account "
            "(they would share files and secrets), and LTI logins are for a class; build an OCI image (./setup.sh as root)"
        )
    lti = lti_settings(site) if spec.authenticator == "lti" else None
    spawner: dict = {"spawner": "process"}
    if image.is_oci:
        if docker_socket is None or gateway is None:
            raise ValueError("an OCI image needs a container API socket and a bridge network to spawn users")
        spawner = {
            "spawner": "docker",
            # Each user's container on a bridge of its own (the template makes it); the hub's
            # API listens on the default bridge's gateway, which every container reaches.
            "gateway": gateway,
            "docker_url": f"unix://{docker_socket}",
            "container_prefix": f"olab-{site.name}",
            # Each student's bridge is chosen by core/bridges.py under a lock for the machine,
            # its network named and labelled for this store (the hub runs that module's source).
            "store": str(paths.containers),
            "bridges_code": inspect.getsource(bridges),
            "userns": {"base": USERNS_BASE, "size": USERNS_SIZE},
            # Who owns a home on the host: the container's jovyan, as the user namespace maps it.
            "home_uid": USERNS_BASE + CONTAINER_UID,
            # Each server's API token, a file of its user's mounted into its container.
            "tokens": str(paths.runtime / "api-tokens"),
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
        **({"lti": lti} if lti is not None else {}),
        "site": site.name,
        "host": hub.host,
        "port": hub.port,
        "hub_api_port": hub.hub_api_port,
        "proxy_api_port": hub.proxy_api_port,
        "admins": list(spec.admins),
        "default_url": spec.default_url,
        "start_timeout": spec.start_timeout_seconds,
        # A started server seen as soon as it listens (the hub runs that module's source).
        "seen_at_once_code": inspect.getsource(seen_at_once),
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
                "command": [sys.executable, "-m", "core.culler"],  # ends with its hub; no token in its log
                "timeout": spec.cull_idle_seconds,
                "every": max(5, min(300, spec.cull_idle_seconds // 2)),
            }
            if spec.cull_idle_seconds
            else None
        ),
    }


def lti_settings(site: Site) -> dict:
    """The local hub's LTI 1.3 settings: the site's course platform, the admin rule's code,
    and a fingerprint of the stored client id (never the id: the hub reads that from the
    0600 store), so that a replaced client id restarts the hub at the next deploy.
    HubError (one line) when no client id is stored."""
    platform = site.config.hub.lti
    if platform is None:  # the site file's validation requires it; said here if ever not
        raise HubError(f"{site.source}: hub.authenticator lti needs a hub.lti section (issuer, authorize_url, jwks_endpoint)")
    store = SecretStore(site.paths.secrets)
    client_id = store.get(LTI_CLIENT_ID)
    if client_id is None:
        raise HubError(
            f"{site.source}: hub.authenticator lti: no LTI client id in the site's secret store; store the id the course "
            f"platform gave this tool with `olab secrets init --site {_site_ref(site)} --lti-client-id ID`"
        )
    key = bytes.fromhex(store.load().cookie_secret.get_secret_value())
    return {
        "issuer": platform.issuer,
        "authorize_url": platform.authorize_url,
        "jwks_endpoint": platform.jwks_endpoint,
        "username_key": platform.username_key,
        "uri_scheme": "http",  # the hub is on loopback, without TLS
        "client_id_fingerprint": hmac.new(key, client_id.encode(), hashlib.sha256).hexdigest()[:16],
        "admin_hook": lti_admin_hook_code(),
    }


def _site_ref(site: Site) -> str:
    """How `--site` names this site: its name when it is the project's sites/<name>.yaml."""
    return site.name if site.source == site.project / "sites" / f"{site.name}.yaml" else str(site.source)


def config_hash(settings: dict, template: str, labs_hash: str) -> str:
    return content_hash(
        [
            ("settings", json.dumps(settings, sort_keys=True).encode()),
            ("template", template.encode()),
            ("labs", labs_hash.encode()),
        ]
    )


def written_settings(site: Site) -> dict | None:
    """The settings document the site's hub was last started with, if any."""
    try:
        return json.loads((site.paths.hub / "olab-hub.json").read_text())
    except (OSError, ValueError):
        return None


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
        _stop_orphan_proxy(site)
        return None
    stop_process(current.pid, grace_seconds=30)
    _stop_orphan_proxy(site)
    return current.pid


def _stop_orphan_proxy(site: Site) -> None:
    """A hub killed outright leaves its proxy running, holding the site's port: stopped by
    the pid file the hub wrote, if that pid is still olab's proxy (not a reused pid)."""
    pid_file = site.paths.hub / "proxy.pid"
    pid = read_pid_file(pid_file)
    try:
        ours = pid is not None and b"tasks.proxy" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        ours = False
    if ours:
        task_logger().warning("stopping the proxy its hub left running (pid %d)", pid)
        stop_process(pid)
    pid_file.unlink(missing_ok=True)
