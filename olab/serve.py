"""`olab serve`: the Prefect UI on 127.0.0.1 and every deployment of prefect.yaml.

Deployments are served by this process (no work pool is needed on one
machine), each with its parameter form and its schedules, so an operator can
run any lifecycle flow of the site from the UI.
"""

from __future__ import annotations

import importlib
import json
import os
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


def running_server() -> str | None:
    """The API URL of the Prefect server a live `olab serve` started, if it answers."""
    try:
        info = json.loads(server_file().read_text())
        url, pid = info["url"], int(info["pid"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return url if pid_alive(pid) and http_answers(f"{url}/health") else None


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


def start_prefect_server(site: Site, port: int) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": url}
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
    from prefect.settings import PREFECT_API_URL, temporary_settings

    specs = read_deployments(find_project())
    site.paths.logs.mkdir(parents=True, exist_ok=True)
    deployments = to_runner_deployments(site, specs)
    external = os.environ.get("PREFECT_API_URL")
    pid = None
    if external:
        url = external
    else:
        pid, url = start_prefect_server(site, port)
        print(f"Prefect UI: {url.removesuffix('/api')}  (server pid {pid}, log {site.paths.logs / 'prefect-server.log'})")
        # Other olab commands on this machine run their flows on this server (and show in its UI).
        write_json(server_file(), {"url": url, "pid": pid, "site": site.name})
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            serve(*deployments)
    except KeyboardInterrupt:
        pass
    finally:
        if pid:
            server_file().unlink(missing_ok=True)
            stop_process(pid)
    return 0
