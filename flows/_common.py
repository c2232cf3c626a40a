"""What every lifecycle flow does first and last: open its site and platform, publish its result."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from core.config import Site, load_site
from core.models import FlowPlan, HealthReport, PlannedStep
from core.planning import Refused
from core.platform import Platform, TargetNotReady
from targets import platform_for


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
    lines += [f"| {c.name} | {'yes' if c.ok else 'NO'} | {c.seconds:.1f} | {c.detail} |" for c in report.checks]
    return lines
