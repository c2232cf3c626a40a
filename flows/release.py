"""release: build-image -> test-notebooks -> deploy-hub -> health check (what CI runs)."""

from __future__ import annotations

from prefect import flow

from core.guard import site_guard
from core.models import FlowPlan, PlannedStep, ReleaseResult
from core.planning import hub_spec
from flows._common import health_markdown, open_site, publish, publish_plan, subflow
from flows.build_image import image_for, plan_image
from flows.deploy_hub import check_hub, deploy_hub
from flows.test_notebooks import lab_steps, plan_lab_run, test_notebooks
from tasks.notebooks import discover_labs


@flow(name="release")
def release(site: str = "local", dry_run: bool = False) -> ReleaseResult | FlowPlan:
    """Ship the labs: a failing lab stops the release before anything is deployed.

    Args:
        site: the site's name (its file in sites/); the olab CLI also takes a site file's path, deployed runs take names only.
        dry_run: only say what would be built, tested and deployed; change nothing.
    """
    the_site, platform = open_site(site, "release")
    with site_guard(the_site):
        if dry_run:
            built = plan_image(the_site, platform)
            sources, _, labs = plan_lab_run(the_site, built.existing, None)
            steps = built.steps + lab_steps(built.existing, sources, labs.reused)
            if built.existing is None:
                steps.append(PlannedStep(verb="start", subject="the hub on the new image", detail="restarting it if it runs"))
            else:
                hub = platform.plan_hub(hub_spec(the_site, built.existing, discover_labs(the_site.labs_dir)))
                verb = {"start": "start", "restart": "restart", "unchanged": "leave"}[hub.action]
                steps.append(PlannedStep(verb=verb, subject=f"the hub at {hub.url}", detail=hub.reason))
            steps.append(PlannedStep(verb="check", subject="the hub's health"))
            return publish_plan(the_site, "release", steps)
        # Subflows only where there is work, and without heartbeats of their own (this run's
        # heartbeat covers them: flows/_common.py, subflow).
        image, image_source = image_for(site, the_site, platform)
        labs = subflow(test_notebooks, site=site, image=image)
        hub = subflow(deploy_hub, site=site, image=image, check=False)
        health = check_hub(the_site, platform)
        publish(
            the_site,
            "release",
            [
                f"# release: {the_site.name}",
                "",
                f"- image `{image.pinned}`: {image_source}",
                f"- labs: {len(labs.results)} passed ({sum(r.cached for r in labs.results)} unchanged, not rerun)",
                f"- hub: {hub.url} ({hub.action})",
                "",
                *health_markdown(health),
            ],
            f"release on {the_site.name}",
        )
        return ReleaseResult(image=image, labs=labs, hub=hub, health=health)
