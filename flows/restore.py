"""restore: the Monday morning restore from the newest complete restore point.

The restore point is unpacked beside the runtime and every file checked
against its manifest; only a fully verified copy replaces the runtime. The
restore point itself is only ever read. Then the hub is redeployed with the
same image digest and checked.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.logging import get_run_logger

from core.config import Site
from core.faults import checkpoint
from core.guard import site_guard
from core.models import FlowPlan, RestoreReport
from core.planning import plan_restore, restore_steps
from flows._common import open_site, publish, publish_plan
from flows.deploy_hub import deploy_hub


def _publish(site: Site, report: RestoreReport) -> RestoreReport:
    rows = [f"| {u.user} | {u.files} | {u.bytes} | {'yes' if u.verified else 'NO'} |" for u in report.users]
    publish(
        site,
        "restore",
        [
            f"# restore: {site.name}",
            "",
            f"- restore point: `{report.restore_point}`" if report.restore_point else f"- {report.note}",
            f"- hub: {report.hub.url} ({report.hub.action})" if report.hub else "- hub: not deployed",
            f"- seconds: {report.seconds:.1f}",
            "",
            "| user | files | bytes | verified |",
            "|---|---|---|---|",
            *(rows or ["| (none) | 0 | 0 | |"]),
        ],
        f"restore of {site.name}" + (f" from {report.restore_point}" if report.restore_point else ""),
    )
    return report


@flow(name="restore")
def restore(site: str = "local", restore_point: str | None = None, dry_run: bool = False) -> RestoreReport | FlowPlan:
    """Bring a torn-down site back, bit for bit, and redeploy its hub.

    Args:
        site: the site's name (its file in sites/); the olab CLI also takes a site file's path, deployed runs take names only.
        restore_point: the id of the restore point to use (default: the newest complete one).
        dry_run: only say what would be restored and started; change nothing.
    """
    the_site, platform = open_site(site, "restore")
    logger = get_run_logger()
    started = time.monotonic()
    with site_guard(the_site):
        mark = platform.read_mark()
        exists = platform.data_facts().exists if mark is None else True
        decision = plan_restore(the_site.name, mark, exists, platform.restore_points(), restore_point)
        if dry_run:
            return publish_plan(the_site, "restore", restore_steps(decision, str(the_site.paths.runtime)))
        if decision.kind == "ensure-deployed":
            # A restore that finished its swap before it was stopped: make sure the hub runs.
            logger.info("site %s is not torn down; making sure its hub is deployed", the_site.name)
            hub = deploy_hub(site=site)
            return _publish(the_site, RestoreReport(
                site=the_site.name, restore_point=None, users=[], hub=hub,
                seconds=time.monotonic() - started, note="site was not torn down; hub ensured",
            ))
        chosen = decision.point
        if decision.finish_deletion:
            # The teardown did not finish deleting: finish it before restoring over it.
            platform.release_runtime()
        logger.info("restoring %s", chosen.id)
        platform.write_mark("restoring", chosen.id)
        checkpoint("restore", "mark")
        users = platform.bring_back_user_data(chosen.id)
        logger.info("restore point %s unpacked and verified: %d users", chosen.id, len(users))
        checkpoint("restore", "unpack")
        platform.swap_in_restored()
        checkpoint("restore", "swap")
        image = platform.restore_point_image(chosen.id)
        platform.clear_mark()
        checkpoint("restore", "unmark")
        hub = deploy_hub(site=site, image=image)
        checkpoint("restore", "deploy")
        return _publish(the_site, RestoreReport(
            site=the_site.name, restore_point=chosen.id, users=users, hub=hub, seconds=time.monotonic() - started,
        ))
