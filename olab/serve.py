"""`olab serve`: every deployment of prefect.yaml, on olab's Prefect server (its UI on 127.0.0.1).

Deployments are served by this process (no work pool is needed on one
machine), each with its parameter form and its schedules, so an operator can
run any lifecycle flow of the site from the UI.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from core.config import ConfigError, Site, find_project

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


def serve_site(site: Site, port: int | None = None) -> int:
    """Serve the site's deployments on olab's Prefect server (started first if it is not
    running, on ``port`` or else 4200), or on the Prefect API the caller configured.
    The server stays up when serve ends: other commands and the UI go on using it."""
    from prefect import serve

    from olab import prefect_server

    specs = read_deployments(find_project())
    deployments = to_runner_deployments(site, specs)
    server = None
    if external := prefect_server.configured_api():
        print(f"Prefect API: {external}")
    else:
        server, started = prefect_server.ensure_started(port)
        verb = "started" if started else "running"
        print(f"Prefect UI: {server.ui}  (olab's Prefect server, {verb}, pid {server.pid}, log {prefect_server.log_file()}); "
              "it asks for the login `olab credentials` shows, and stays up when serve ends (`olab server stop`)")
    try:
        with prefect_server.using(server):
            serve(*deployments)
    except KeyboardInterrupt:
        pass
    return 0
