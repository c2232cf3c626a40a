"""What every lifecycle flow does first and last: open its site and platform, publish its result."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from core.config import Site, load_site
from core.models import FlowPlan, HealthReport, PlannedStep
from core.planning import Refused
from core.platform import Platform, TargetNotReady
from targets import platform_for

R = TypeVar("R")


def open_site(ref: str, flow: str) -> tuple[Site, Platform]:
    """The validated site and the platform of its target, which refuses in one line a
    flow it cannot run yet."""
    from prefect.runtime import deployment

    if deployment.id and ("/" in ref or ref.endswith((".yaml", ".yml")) or ref.startswith(".")):
        # A deployment can be run by anyone who reaches the Prefect API: it takes the name of
        # a site in the project's sites/, never a file someone else wrote.
        raise Refused(f"a deployed flow takes a site name from the project's sites/, not a path: {ref!r}")
    site = load_site(ref)
    platform = platform_for(site)
    if reason := platform.not_ready(flow):
        raise TargetNotReady(reason)
    get_run_logger().info("site %s (%s), from %s", site.name, site.config.target.value, site.source)
    return site, platform


def artifact_key(site: Site, what: str) -> str:
    return f"{site.name}-{what}".lower()


def publish(site: Site, flow: str, markdown: list[str], description: str) -> None:
    create_markdown_artifact(key=artifact_key(site, flow), description=description, markdown="\n".join(markdown))


def publish_plan(site: Site, flow: str, steps: list[PlannedStep]) -> FlowPlan:
    """A dry run's result: logged, published as the flow's artifact, returned."""
    plan = FlowPlan(flow=flow, site=site.name, steps=steps)
    logger = get_run_logger()
    for line in plan.lines():
        logger.info("dry run: %s", line)
    create_markdown_artifact(
        key=artifact_key(site, flow), description=f"{flow} on {site.name}: dry run", markdown=plan.markdown()
    )
    return plan


def health_markdown(report: HealthReport | None) -> list[str]:
    if report is None:
        return ["health check skipped"]
    lines = ["| check | ok | seconds | detail |", "|---|---|---|---|"]
    for c in report.checks:
        detail = " ".join(c.detail.split()).replace("|", "\\|")
        if c.link:  # a file on the machine that ran the check (the browser's screenshot)
            detail += f" ([screenshot]({Path(c.link).absolute().as_uri()}))"
        lines.append(f"| {c.name} | {'yes' if c.ok else 'NO'} | {c.seconds:.1f} | {detail} |")
    return lines


def subflow(flow: Callable[..., R], **parameters) -> R:
    """Run a lifecycle flow as a subflow of the current flow run, without a heartbeat of its own.

    Why: Prefect 3.9 gives every synchronous flow run, subflows included, a heartbeat
    thread that sleeps in 1 s steps and is joined when the run ends
    (``prefect/flow_engine.py``, ``_send_heartbeats``): each run ends up to 1 s after
    its work, whatever PREFECT_FLOWS_HEARTBEAT_FREQUENCY is. A subflow runs in its
    parent's thread and process, and the parent's heartbeat thread keeps beating all
    the while, so the child's own adds no crash detection: if the process dies, the
    parent's heartbeats stop and olab's automation (``olab/crash_detection.py``: it
    fires only *after* a run's heartbeat, so a run that never sent one is never
    marked) sets the parent Crashed; the child, left Running, is marked Crashed by the
    next flow on the site (``core.guard``). A top-level run (``olab build``, a
    deployment run) keeps its heartbeat: only the child's settings change, in a
    settings context that lives as long as the call (the parent's heartbeat thread
    copied its own context when it started).
    """
    from prefect.context import SettingsContext, get_settings_context

    current = get_settings_context()
    settings = current.settings
    # model_copy, not temporary_settings: the same settings without re-validating all of them (~40 ms).
    quiet = settings.model_copy(update={"flows": settings.flows.model_copy(update={"heartbeat_frequency": None})})
    with SettingsContext(profile=current.profile, settings=quiet):
        return flow(**parameters)
