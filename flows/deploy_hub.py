"""deploy-hub: the site's JupyterHub, started or reconfigured in place, then checked."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

from prefect import flow
from prefect.logging import get_run_logger

from core.browser_verdict import BROWSER_CHECK, browser_check
from core.config import Site
from core.guard import site_guard
from core.models import Check, FlowPlan, HealthReport, HubDeployment, ImageRef, PlannedStep, UserLogin
from core.planning import Refused, hub_spec
from core.platform import Platform
from core.state import load_state, update_state
from flows._common import health_markdown, open_site, publish, publish_plan
from tasks.browser import chromium, screenshot_path, view_dashboard
from tasks.hub_api import (
    HEALTH_USER,
    health_user_login,
    log_checks,
    render_in_voila,
    start_test_server,
    stop_after_failure,
    stop_test_server,
)
from tasks.notebooks import discover_labs


class NothingToDeploy(Refused):
    pass


class SiteTornDown(Refused):
    pass


class HealthCheckFailed(RuntimeError):
    pass


def _in_browser(site: Site) -> Callable[[UserLogin], Check]:
    """The health check's look at the lab as a student: its dashboard in Chromium, a slider
    moved, judged; the screenshot goes to the site's runtime folder (the last few are kept)."""
    lab = site.config.labs.health_check_lab
    timeout = float(site.config.hub.start_timeout_seconds)

    def look(login: UserLogin) -> Check:
        shot = screenshot_path(site.paths.runtime / "health", lab)
        return browser_check(view_dashboard(login, f"voila/render/labs/{quote(lab)}.ipynb", shot, timeout))

    return look


def check_hub(site: Site, platform: Platform) -> HealthReport:
    """The health check on the live hub, recorded in the site's state; a failure says what
    the target saw of the test user's server (its pod's events, the hub's log), or what a
    student's browser showed of the lab (the report, with its screenshot, is published).

    Once the test user's server is up, the two looks at the lab run at once: Voilà's page
    through the API as a task on the flow's task runner, the student's browser in this
    thread (each renders the lab in a kernel of its own); then the server is stopped."""
    browser = site.config.labs.browser_check
    if browser:
        chromium()  # a machine without the browser is told so before the hub is asked anything
    access = platform.hub_access()
    lab, timeout = site.config.labs.health_check_lab, float(site.config.hub.start_timeout_seconds)
    try:
        checks = start_test_server(access, timeout)
        render = render_in_voila.submit(access, lab, timeout)
        try:
            if browser:
                with health_user_login(access, timeout) as login:
                    look = _in_browser(site)(login)
            else:
                look = Check(name=BROWSER_CHECK, ok=True, detail="off (labs.browser_check: false in the site file)")
            checks += [render.result(), look]
        except Exception:
            render.wait()  # the server stays up until both have finished with it
            stop_after_failure(access)
            raise
        checks.append(stop_test_server(access, timeout))
    except Exception as exc:
        seen = platform.spawn_report(HEALTH_USER)
        raise HealthCheckFailed(f"{exc}" + ("; the test user's server: " + " | ".join(seen) if seen else "")) from None
    log_checks(checks)
    report = HealthReport(hub_url=access.url, checks=checks)
    update_state(site, health=report)
    if not report.ok:
        failed = next(c for c in report.checks if not c.ok)
        publish(site, "health-check", [f"# health check: {site.name}: FAILED", "", *health_markdown(report)],
                f"health check on {site.name}: {failed.name} failed")
        raise HealthCheckFailed(f"{failed.name}: {failed.detail}" + (f" (screenshot: {failed.link})" if failed.link else ""))
    return report


@flow(name="deploy-hub")
def deploy_hub(
    site: str = "local", image: ImageRef | None = None, check: bool = True, dry_run: bool = False
) -> HubDeployment | FlowPlan:
    """Run the hub on the given image (default: the last one built), then check it.

    Args:
        site: the site's name (its file in sites/); the olab CLI also takes a site file's path, deployed runs take names only.
        image: the image users' servers run (default: the one build-image made last).
        check: health-check the hub afterwards (a test user spawns a server and renders a lab).
        dry_run: only say whether the hub would be started, restarted or left alone; change nothing.
    """
    the_site, platform = open_site(site, "deploy-hub")
    logger = get_run_logger()
    with site_guard(the_site):
        mark = platform.read_mark()
        if mark is not None:
            raise SiteTornDown(
                f"site {the_site.name} is torn down (restore point {mark.restore_point}); run `olab restore`, not deploy"
            )
        image = image or load_state(the_site).image
        if image is None:
            raise NothingToDeploy(f"site {the_site.name}: no image built yet; run `olab build` (or `olab up`) first")
        labs = discover_labs(the_site.labs_dir)
        spec = hub_spec(the_site, image, labs)
        plan = platform.plan_hub(spec)
        logger.info("hub plan: %s (%s)", plan.action, plan.reason)
        if dry_run:
            verb = {"start": "start", "restart": "restart", "unchanged": "leave"}[plan.action]
            steps = [PlannedStep(verb=verb, subject=f"the hub at {plan.url}", detail=plan.reason)]
            steps += [PlannedStep(verb="update", subject=change) for change in plan.changes]
            steps.append(PlannedStep(verb="check" if check else "skip", subject="the hub's health"))
            return publish_plan(the_site, "deploy-hub", steps)
        if plan.changes:
            publish(the_site, "deploy-hub-diff", [f"# deploy-hub: {the_site.name}: what changes ({plan.action})", "",
                                                  *[f"- {line}" for line in plan.changes]],
                    f"deploy-hub on {the_site.name}: {len(plan.changes)} settings change")
        deployment = platform.apply_hub(spec, plan)
        update_state(the_site, hub=deployment)
        report = check_hub(the_site, platform) if check else None
        publish(
            the_site,
            "deploy-hub",
            [
                f"# deploy-hub: {the_site.name}",
                "",
                f"- hub: {deployment.url}, action: **{plan.action}** ({plan.reason})",
                f"- image: `{image.pinned}`",
                f"- config: `{plan.config_hash[:16]}`, labs: {', '.join(lab.name for lab in labs)}",
                f"- admins: {', '.join(spec.admins)}",
                "",
                *health_markdown(report),
            ],
            f"deploy-hub on {the_site.name}: {plan.action}",
        )
        return deployment
