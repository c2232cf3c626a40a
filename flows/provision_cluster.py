"""provision-cluster: what the hub runs on (local: this machine's folders, ports and tools)."""

from __future__ import annotations

from prefect import flow

from core.guard import site_guard
from core.models import FlowPlan, PlannedStep, ProvisionReport
from flows._common import open_site, publish, publish_plan


class ProvisionFailed(RuntimeError):
    pass


@flow(name="provision-cluster")
def provision_cluster(site: str = "local", dry_run: bool = False) -> ProvisionReport | FlowPlan:
    """Prepare what the site's hub runs on, and check it.

    site: a site name in sites/ (or a site file's path).
    dry_run: only check, and say what would be created; change nothing.
    """
    the_site, platform = open_site(site)
    with site_guard(the_site):
        report = platform.provision(dry_run=dry_run)
        if dry_run:
            return publish_plan(
                the_site,
                "provision-cluster",
                [PlannedStep(verb="prepare" if c.planned else "check", subject=c.name, detail=c.detail) for c in report.checks],
            )
        publish(
            the_site,
            "provision-cluster",
            [f"# provision-cluster: {the_site.name} ({report.target})", "", "| check | ok | detail |", "|---|---|---|"]
            + [f"| {c.name} | {'yes' if c.ok else 'NO'} | {c.detail} |" for c in report.checks],
            f"provision-cluster on {the_site.name}",
        )
        failed = [f"{c.name}: {c.detail}" for c in report.checks if not c.ok]
        if failed:
            raise ProvisionFailed("; ".join(failed))
        return report
