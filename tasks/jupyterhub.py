"""The local JupyterHub: its process, its files, and its REST API.

The hub runs from olab's own Python as a background server whose pid and log
live in the site's runtime folder; users' servers run from the built user
environment. Everything else talks to it over its REST API with the olab
service token from the site's secret store.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from olab.logs import task_logger

from olab.config import Site
from olab.files import atomic_write, write_json
from olab.models import Check, HealthReport, HubAction, HubDeployment, ImageRef
from olab.retry import TransientError, retry_options
from olab.runner import ToolMissing, pid_alive, start_background, stop_process
from olab.secrets import HubSecrets, SecretStore

HEALTH_USER = "olab-health"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


class HubError(RuntimeError):
    """The hub did something other than what was asked; the message says what."""


def proxy_command() -> list[str]:
    beside_python = Path(sys.executable).parent / "configurable-http-proxy"
    found = shutil.which("configurable-http-proxy") or (str(beside_python) if beside_python.exists() else None)
    if not found:
        raise ToolMissing(
            "configurable-http-proxy is not installed: pip install configurable-http-proxy "
            "(it comes with `pip install -e .`) or npm install -g configurable-http-proxy"
        )
    return [found]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def hub_log(site: Site) -> Path:
    return site.paths.logs / "hub.log"


def log_tail(site: Site, lines: int = 15) -> str:
    path = hub_log(site)
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def write_hub_files(site: Site, settings: dict, template: str) -> Path:
    hub_dir = site.paths.hub
    hub_dir.mkdir(parents=True, exist_ok=True)
    write_json(hub_dir / "olab-hub.json", settings)
    config = hub_dir / "jupyterhub_config.py"
    atomic_write(config, template)
    return config


def is_running(deployment: HubDeployment | None) -> bool:
    return deployment is not None and pid_alive(deployment.pid)


def wait_until_ready(site: Site, pid: int, timeout: float) -> None:
    url = f"{site.hub_url}/hub/api/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise HubError(f"the hub exited while starting; last lines of {hub_log(site)}:\n{log_tail(site)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise HubError(f"the hub did not answer at {url} within {timeout:.0f}s; see {hub_log(site)}")


@task(name="apply-hub", cache_policy=NO_CACHE)
def apply_hub(
    site: Site,
    image: ImageRef,
    settings: dict,
    template: str,
    config_hash: str,
    action: HubAction,
    current: HubDeployment | None,
) -> HubDeployment:
    """Start, restart or leave the hub, as planned."""
    logger = task_logger()
    if action == "unchanged":
        assert current is not None
        logger.info("hub %s already runs this configuration (pid %d); nothing to do", current.url, current.pid)
        return current.model_copy(update={"action": "unchanged"})
    if action == "restart" and current is not None:
        logger.info("configuration changed; stopping hub pid %d", current.pid)
        stop_process(current.pid)
    hub = site.config.hub
    for port in (hub.port, hub.hub_api_port, hub.proxy_api_port):
        if port_in_use(hub.host, port):
            raise HubError(f"port {port} on {hub.host} is already in use; stop what holds it or pick other ports in {site.source}")
    config = write_hub_files(site, settings, template)
    site.paths.homes.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "PREFECT_"))}
    pid = start_background(
        [sys.executable, "-m", "jupyterhub", "-f", str(config)],
        cwd=site.paths.hub,
        log_file=hub_log(site),
        env=env,
    )
    logger.info("hub starting (pid %d), log: %s", pid, hub_log(site))
    try:
        wait_until_ready(site, pid, timeout=hub.start_timeout_seconds)
    except Exception:
        stop_process(pid)
        raise
    logger.info("hub ready at %s", site.hub_url)
    return HubDeployment(
        url=site.hub_url,
        pid=pid,
        config_hash=config_hash,
        image=image,
        started_at=datetime.now(UTC),
        action=action,
    )


def stop_hub(deployment: HubDeployment | None) -> bool:
    """Stop the hub and, through its own cleanup, every user server; data stays."""
    if deployment is None:
        return False
    return stop_process(deployment.pid, grace_seconds=30)


class HubAPI:
    """The hub's REST API, authenticated as the olab service."""

    def __init__(self, site: Site, secrets: HubSecrets, timeout: float = 30.0):
        self.site = site
        self._client = httpx.Client(
            base_url=site.hub_url,
            headers={"Authorization": f"token {secrets.api_token.get_secret_value()}"},
            timeout=timeout,
        )

    def __enter__(self) -> HubAPI:
        return self

    def __exit__(self, *exc) -> None:
        self._client.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = self._client.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                # An HTML error page: its title says enough.
                title = re.search(r"<title>(.*?)</title>", response.text, re.S)
                message = title.group(1).strip() if title else response.text[:120]
            raise httpx.HTTPStatusError(
                f"{method} {path}: {response.status_code} {message}", request=response.request, response=response
            )
        return response

    def version(self) -> str:
        return self.request("GET", "/hub/api/").json()["version"]

    def ensure_user(self, name: str) -> None:
        if self._client.get(f"/hub/api/users/{quote(name)}").status_code == 404:
            self.request("POST", f"/hub/api/users/{quote(name)}")

    def user(self, name: str) -> dict:
        return self.request("GET", f"/hub/api/users/{quote(name)}").json()

    def users(self) -> list[dict]:
        return self.request("GET", "/hub/api/users").json()

    def start_server(self, name: str, timeout: float) -> None:
        # A stop still under way (say, from an earlier attempt's clean-up) must finish first.
        self._wait(name, lambda server: not (server and server.get("pending")), timeout, "done stopping")
        server = self.user(name).get("servers", {}).get("")
        if not (server and server.get("ready")):
            self.request("POST", f"/hub/api/users/{quote(name)}/server")
        self._wait(name, lambda server: bool(server and server.get("ready")), timeout, "ready")

    def stop_server(self, name: str, timeout: float) -> None:
        if self.user(name).get("servers", {}).get(""):
            self.request("DELETE", f"/hub/api/users/{quote(name)}/server")
        self._wait(name, lambda server: not server, timeout, "stopped")

    def _wait(self, name: str, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = self.user(name).get("servers", {}).get("")
            if done(server):
                return
            time.sleep(0.25)
        raise TransientError(f"server of {name} not {what} after {timeout:.0f}s")

    def get_user_page(self, name: str, path: str, timeout: float) -> httpx.Response:
        return self.request("GET", f"/user/{quote(name)}/{path}", timeout=timeout)


def _timed(checks: list[Check], name: str, step) -> object:
    started = time.monotonic()
    try:
        detail = step()
    except Exception as exc:
        checks.append(Check(name=name, ok=False, detail=str(exc)[:300], seconds=time.monotonic() - started))
        raise
    checks.append(Check(name=name, ok=True, detail=str(detail or ""), seconds=time.monotonic() - started))
    return detail


class HealthCheckFailed(RuntimeError):
    def __init__(self, report: HealthReport):
        self.report = report
        failed = next(c for c in report.checks if not c.ok)
        super().__init__(f"health check '{failed.name}' failed: {failed.detail}")


@task(name="hub-health-check", cache_policy=NO_CACHE, **retry_options(retries=2))
def health_check(site: Site, lab: str) -> HealthReport:
    """Create a test user, start their server, render a lab in Voilà, stop it."""
    logger = task_logger()
    secrets = SecretStore(site.paths.secrets).load()
    timeout = float(site.config.hub.start_timeout_seconds)
    checks: list[Check] = []
    with HubAPI(site, secrets) as api:
        try:
            _timed(checks, "hub api", lambda: f"JupyterHub {api.version()}")
            _timed(checks, "create test user", lambda: api.ensure_user(HEALTH_USER) or HEALTH_USER)
            _timed(checks, "start server", lambda: api.start_server(HEALTH_USER, timeout))
            _timed(
                checks,
                "server status",
                lambda: "last activity " + str(api.get_user_page(HEALTH_USER, "api/status", 30).json().get("last_activity")),
            )

            def render() -> str:
                page = api.get_user_page(HEALTH_USER, f"voila/render/labs/{quote(lab)}.ipynb", timeout)
                widgets = page.text.count(WIDGET_MIME)
                if widgets == 0:
                    raise HubError(f"Voilà rendered labs/{lab}.ipynb without any widget")
                return f"labs/{lab}.ipynb: {len(page.content)} bytes, {widgets} widget views"

            _timed(checks, "render lab in Voilà", render)
            _timed(checks, "stop server", lambda: api.stop_server(HEALTH_USER, timeout))
        except Exception:
            try:
                api.stop_server(HEALTH_USER, 30)
            except Exception as cleanup:  # report the first failure, not the cleanup's
                logger.warning("could not stop %s's server after a failed check: %s", HEALTH_USER, cleanup)
            raise
    for check in checks:
        logger.info("%-20s ok  %5.1fs  %s", check.name, check.seconds, check.detail)
    return HealthReport(hub_url=site.hub_url, checks=checks)
