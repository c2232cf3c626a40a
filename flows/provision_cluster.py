"""provision-cluster: what the hub runs on (local: this machine; gke: the cluster, by Terraform).

The plan comes first, as an artifact; a plan that destroys or replaces anything
waits for an operator's approval in the Prefect UI (or the ``approve`` parameter,
for CI); a plan that changes nothing applies nothing.
"""

from __future__ import annotations

from prefect import flow

from core.guard import site_guard
from core.models import FlowPlan, ProvisionReport
from flows._approval import approved
from flows._common import open_site, publish, publish_plan


class ProvisionFailed(RuntimeError):
    pass


@flow(name="provision-cluster")
def provision_cluster(site: str = "local", dry_run: bool = False, approve: bool = False) -> ProvisionReport | FlowPlan:
    """Prepare what the site's hub runs on, and check it.

    Args:
        site: the site's name (its file in sites/); the olab CLI also takes a site file's path, deployed runs take names only.
        dry_run: only plan, and publish the plan; change nothing.
        approve: apply a plan that destroys or replaces something without waiting for an operator (for CI).
    """
    the_site, platform = open_site(site, "provision-cluster")
    with site_guard(the_site):
        plan = platform.plan_provision()
        if dry_run:
            return publish_plan(the_site, "provision-cluster", plan.steps)
        approved(the_site, "provision-cluster", plan, approve)
        report = platform.provision(plan)
        publish(
            the_site,
            "provision-cluster",
            [f"# provision-cluster: {the_site.name} ({report.target})", "", f"- plan: {plan.summary}" + ("" if plan.changes else " (nothing applied)"), ""]
            + ["| check | ok | detail |", "|---|---|---|"]
            + [f"| {c.name} | {'yes' if c.ok else 'NO'} | {c.detail} |" for c in report.checks]
            + ([f"", f"- kubeconfig: `{report.kubeconfig}` (0600)"] if report.kubeconfig else [])
            + [f"- {k}: `{v}`" for k, v in sorted(report.outputs.items())],
            f"provision-cluster on {the_site.name}",
        )
        failed = [f"{c.name}: {c.detail}" for c in report.checks if not c.ok]
        if failed:
            raise ProvisionFailed("; ".join(failed))
        return report
