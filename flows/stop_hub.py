"""stop-hub: stop the site's hub and every user server; all data stays."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from core.guard import site_guard
from core.models import FlowPlan, PlannedStep
from flows._common import open_site, publish, publish_plan


@flow(name="stop-hub")
def stop_hub(site: str = "local", dry_run: bool = False) -> bool | FlowPlan:
    """Stop the hub and every user server, keeping all data; returns whether a hub was running.

    Args:
        site: the site's name (its file in sites/); the olab CLI also takes a site file's path, deployed runs take names only.
        dry_run: only say what would be stopped; change nothing.
    """
    the_site, platform = open_site(site, "stop-hub")
    with site_guard(the_site):
        if dry_run:
            state = platform.hub_state()
            step = (
                PlannedStep(verb="stop", subject=f"the hub at {state.url} and every user server", detail=state.detail)
                if state.running
                else PlannedStep(verb="leave", subject="the hub", detail="not running")
            )
            return publish_plan(the_site, "stop-hub", [step])
        stopped = platform.stop_hub()
        message = f"stopped the hub of site {the_site.name}; data kept" if stopped else f"no hub was running for site {the_site.name}"
        get_run_logger().info(message)
        publish(the_site, "stop-hub", [f"# stop-hub: {the_site.name}", "", f"- {message}"], f"stop-hub on {the_site.name}")
        return stopped
