"""`olab serve`: the Prefect UI on 127.0.0.1 and every deployment of prefect.yaml.

Deployments are served by this process (no work pool is needed on one
machine), each with its parameter form and its schedules, so an operator can
run any lifecycle flow of the site from the UI.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from core.config import ConfigError, Site, find_project, olab_home
from core.files import write_json
from core.runner import ServerDidNotStart, http_answers, pid_alive, start_server, stop_process


def server_file() -> Path:
    """Where `olab serve` says which Prefect server it runs, for the other commands."""
    return olab_home() / "prefect-server.json"


PREFECT_AUTH_KEY = "prefect_api_auth"


def prefect_auth(site: Site) -> str:
    """The credential the Prefect server `olab serve` starts requires (HTTP basic,
    ``olab:<random>``), kept in the site's 0600 secret store: nothing on this machine's
    loopback (a student's process included) can run or read flows without it."""
    from core.secrets import SecretStore

    return SecretStore(site.paths.secrets).extra(PREFECT_AUTH_KEY, lambda: "olab:" + secrets.token_urlsafe(24))


def running_server() -> tuple[str, str] | None:
    """(API URL, credential) of the Prefect server a live `olab serve` started, if it answers."""
    from core.secrets import SecretStore

    try:
        info = json.loads(server_file().read_text())
        url, pid, store = info["url"], int(info["pid"]), Path(info["secrets"])
        auth = (SecretStore(store).load().__pydantic_extra__ or {})[PREFECT_AUTH_KEY]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    auth = auth.get_secret_value() if hasattr(auth, "get_secret_value") else str(auth)
    return (url, auth) if pid_alive(pid) and http_answers(f"{url}/health") else None


# The slug that marks a prefect.yaml schedule as the site's own (schedules.<which> of the
# site file, in its timezone); `prefect deploy` keeps the cron written next to it.
SITE_SCHEDULE_SLUGS = {"site-teardown": "teardown", "site-restore": "restore"}


class ScheduleSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    cron: str
    timezone: str | None = None
    active: bool = True
    slug: str | None = None


class DeploymentSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    entrypoint: str = Field(pattern=r"^[\w/]+\.py:\w+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    schedules: list[ScheduleSpec] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)


def read_deployments(project: Path) -> list[DeploymentSpec]:
    path = project / "prefect.yaml"
    if not path.is_file():
        raise ConfigError([f"{path}: no prefect.yaml in the olab project"])
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return [DeploymentSpec.model_validate(d) for d in data.get("deployments", [])]
    except ValueError as exc:
        raise ConfigError([f"{path}: {line}" for line in str(exc).splitlines()[1:2]]) from None


def load_flow(entrypoint: str):
    file_part, attr = entrypoint.split(":")
    module = importlib.import_module(file_part.removesuffix(".py").replace("/", "."))
    return getattr(module, attr)


def is_site_schedule(spec: ScheduleSpec) -> bool:
    return bool(spec.slug and spec.slug.startswith("site-"))


def site_schedule(site: Site, spec: ScheduleSpec):
    """The schedule `olab serve` gives a prefect.yaml schedule for this site."""
    from prefect.client.schemas.schedules import CronSchedule

    if is_site_schedule(spec):
        which = SITE_SCHEDULE_SLUGS.get(spec.slug)
        if which is None:
            raise ConfigError([f"prefect.yaml: schedule slug {spec.slug!r}: use site-teardown or site-restore"])
        return CronSchedule(cron=getattr(site.config.schedules, which), timezone=site.config.schedules.timezone)
    return CronSchedule(cron=spec.cron, timezone=spec.timezone or site.config.schedules.timezone)


def to_runner_deployments(site: Site, specs: list[DeploymentSpec]) -> list:
    deployments = []
    for spec in specs:
        flow = load_flow(spec.entrypoint)
        deployments.append(
            flow.to_deployment(
                name=f"{spec.name}",
                description=spec.description,
                parameters={**spec.parameters, "site": site.name},
                # The site's own weekend schedules always run under serve (the site file sets
                # them); prefect.yaml deploys them paused to a shared server, where no site is chosen.
                schedules=[site_schedule(site, s) for s in spec.schedules if s.active or is_site_schedule(s)],
                tags=[*spec.tags, f"site:{site.name}"],
            )
        )
    return deployments


def start_prefect_server(site: Site, port: int, auth: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}/api"
    # The credential reaches the server through its environment, never argv.
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": url,
           "PREFECT_SERVER_API_AUTH_STRING": auth}
    env.pop("PREFECT_API_URL", None)
    log = site.paths.logs / "prefect-server.log"
    try:
        pid = start_server(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=site.paths.runtime, log_file=log, env=env, ready=lambda: http_answers(f"{url}/health"),
            timeout=90, what=f"the Prefect server on {url}", poll=0.5,
        )
    except ServerDidNotStart as exc:
        raise RuntimeError(str(exc)) from None
    return pid, url


def serve_site(site: Site, port: int = 4200) -> int:
    from prefect import serve
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    specs = read_deployments(find_project())
    site.paths.logs.mkdir(parents=True, exist_ok=True)
    deployments = to_runner_deployments(site, specs)
    external = os.environ.get("PREFECT_API_URL")
    pid = None
    settings = {}
    if external:
        url = external
    else:
        auth = prefect_auth(site)
        pid, url = start_prefect_server(site, port, auth)
        print(f"Prefect UI: {url.removesuffix('/api')}  (server pid {pid}, log {site.paths.logs / 'prefect-server.log'}); "
              "it asks for the credential `olab credentials` shows")
        # Other olab commands on this machine run their flows on this server (and show in its
        # UI): they read its credential from the site's secret store this names.
        write_json(server_file(), {"url": url, "pid": pid, "site": site.name, "secrets": str(site.paths.secrets)})
        settings = {PREFECT_API_AUTH_STRING: auth}
    try:
        with temporary_settings({PREFECT_API_URL: url, **settings}):
            serve(*deployments)
    except KeyboardInterrupt:
        pass
    finally:
        if pid:
            server_file().unlink(missing_ok=True)
            stop_process(pid)
    return 0
