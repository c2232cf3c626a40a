"""teardown: the weekend shutdown that loses nothing.

Stop every user server and the hub, write a restore point of every user's data
and the hub's state, read it back to verify it, and only then release what the
site ran on. Killed at any point and run again, it converges: an unfinished
restore point is never used, and a deletion that was under way is finished
from the mark it left.
"""

from __future__ import annotations

import secrets as _random
import time
from datetime import UTC, datetime

from prefect import flow
from prefect.logging import get_run_logger

from core.config import Site
from core.faults import checkpoint
from core.guard import site_guard
from core.models import FlowPlan, TeardownReport
from core.planning import plan_teardown, teardown_steps
from core.restore_points import restore_point_id
from flows._approval import approved
from flows._common import open_site, publish, publish_plan
from tasks.hub_api import HubAPI, stop_user_servers


def _publish(site: Site, report: TeardownReport) -> TeardownReport:
    publish(
        site,
        "teardown",
        [
            f"# teardown: {site.name}",
            "",
            f"- restore point: `{report.restore_point}`" + (" (the site was already torn down)" if report.already_torn_down else ""),
            f"- users ({len(report.users)}): {', '.join(report.users) or 'none'}",
            f"- files: {report.files}, bytes: {report.bytes}",
            f"- pruned restore points: {', '.join(report.pruned) or 'none'}",
            f"- seconds: {report.seconds:.1f}",
        ],
        f"teardown on {site.name}",
    )
    return report


@flow(name="teardown")
def teardown(site: str = "local", dry_run: bool = False, approve: bool = False) -> TeardownReport | FlowPlan:
    """Stop the site and keep everything in a verified restore point.

    Args:
        site: the site's name (its file in sites/); the olab CLI also takes a site file's path, deployed runs take names only.
        dry_run: only say what would be stopped, kept and deleted; change nothing.
        approve: on a gke site in destroy mode, delete the cluster and the snapshotted disks without
            waiting for an operator (the site file's gke.shutdown.approve_destroy does so for every run).
    """
    the_site, platform = open_site(site, "teardown")
    logger = get_run_logger()
    started = time.monotonic()
    with site_guard(the_site):
        data = platform.data_facts()
        decision = plan_teardown(the_site.name, platform.read_mark(), data)
        if dry_run:
            hub = platform.hub_state()
            running = []
            if hub.running:
                with HubAPI.of(platform.hub_access()) as api:
                    running = api.running_servers()
            steps = teardown_steps(decision, data, hub, running, str(the_site.paths.backups), the_site.config.backups.keep)
            return publish_plan(the_site, "teardown", steps)
        if decision.kind == "finish":
            # A teardown already wrote a verified restore point; finish its deletion only.
            logger.info("restore point %s is complete; finishing the teardown it began", decision.restore_point)
            if release := platform.plan_release(decision.restore_point):
                approved(the_site, "teardown", release, approve)
            platform.release_runtime()
            platform.write_mark("torn-down", decision.restore_point)
            # Retention as a fresh teardown applies it: a run killed after its mark would
            # otherwise leave every later point unpruned.
            pruned = platform.prune_restore_points(protect={decision.restore_point})
            return _publish(the_site, TeardownReport(
                site=the_site.name, restore_point=decision.restore_point, users=[], files=0, bytes=0,
                seconds=time.monotonic() - started, already_torn_down=decision.already_torn_down, pruned=pruned,
            ))
        # Before anything is stopped: the restore point must be writable in full.
        platform.check_backup_room(data.bytes)
        checkpoint("teardown", "preflight")
        if platform.hub_state().running:
            stopped = stop_user_servers(platform.hub_access(), float(the_site.config.hub.start_timeout_seconds))
            logger.info("stopped user servers: %s", ", ".join(stopped) or "none were running")
            checkpoint("teardown", "stop-servers")
            platform.stop_hub()
            logger.info("hub stopped")
        checkpoint("teardown", "stop-hub")
        point_id = restore_point_id(datetime.now(UTC), _random.token_hex(3))
        kept = platform.save_user_data(point_id, data.users)
        checkpoint("teardown", "archive")
        platform.verify_user_data(point_id)
        logger.info("restore point %s verified: %d files, %d bytes", point_id, kept.files, kept.bytes)
        checkpoint("teardown", "verify")
        if release := platform.plan_release(point_id):
            # Nothing is deleted yet: rejected or timed out, the site keeps running and the
            # restore point stays (complete, for the next teardown's retention).
            approved(the_site, "teardown", release, approve)
        platform.write_mark("deleting", point_id)
        checkpoint("teardown", "mark")
        platform.release_runtime()
        platform.write_mark("torn-down", point_id)
        checkpoint("teardown", "delete")
        pruned = platform.prune_restore_points(protect={point_id})
        if savings := platform.shutdown_savings():
            publish(the_site, "teardown-cost", [f"# teardown: {the_site.name}: what the weekend shutdown saves", "", *[f"- {line}" for line in savings]],
                    f"cost saved by the shutdown of {the_site.name}")
        return _publish(the_site, TeardownReport(
            site=the_site.name, restore_point=point_id, users=kept.users, files=kept.files,
            bytes=kept.bytes, seconds=time.monotonic() - started, pruned=pruned,
        ))
