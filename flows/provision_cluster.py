"""provision-cluster: what the hub runs on (local: this machine; gke: the cluster, by Terraform).

The plan comes first, as an artifact; a plan that destroys or replaces anything
waits for an operator's approval in the Prefect UI (or the ``approve`` parameter,
for CI); a plan that changes nothing applies nothing.
"""

from __future__ import annotations

from prefect import flow
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.logging import get_run_logger

from core.config import Site
from core.guard import site_guard
from core.models import FlowPlan, InfraPlan, ProvisionReport
from core.planning import Refused
from flows._common import open_site, publish, publish_plan


class ProvisionFailed(RuntimeError):
    pass


class Approval(RunInput):
    """The operator's answer to a plan that destroys or replaces something."""

    approve: bool = False
    note: str = ""


def plan_markdown(site: Site, plan: InfraPlan, *, waiting: bool = False) -> list[str]:
    rows = [f"| {s.verb} | {s.subject} | {s.detail} |" for s in plan.steps] or ["| (nothing) | | |"]
    head = [f"# provision-cluster: {site.name} ({plan.target}) plan", "", f"**{plan.summary}**", ""]
    if waiting:
        head += ["This plan destroys or replaces something: it waits for an approval (resume the run in the UI with approve).", ""]
    return head + ["| action | what | detail |", "|---|---|---|", *rows]


def await_approval(site: Site, plan: InfraPlan) -> None:
    timeout = site.config.gke.approval_timeout_seconds if site.config.gke else 3600
    logger = get_run_logger()
    logger.warning("the plan destroys or replaces something (%s); waiting up to %ds for an approval", plan.summary, timeout)
    try:
        answer = pause_flow_run(wait_for_input=Approval, timeout=timeout, poll_interval=min(10, max(1, timeout // 5)))
    except FlowPauseTimeout:
        raise Refused(
            f"site {site.name}: the plan ({plan.summary}) was not approved within {timeout}s; nothing was changed "
            "(resume the run in the Prefect UI with approve, or run with approve=True)"
        ) from None
    if not answer.approve:
        raise Refused(f"site {site.name}: the plan ({plan.summary}) was rejected{': ' + answer.note if answer.note else ''}; nothing was changed")
    logger.info("plan approved%s", f": {answer.note}" if answer.note else "")


@flow(name="provision-cluster")
def provision_cluster(site: str = "local", dry_run: bool = False, approve: bool = False) -> ProvisionReport | FlowPlan:
    """Prepare what the site's hub runs on, and check it.

    site: a site name in sites/ (or a site file's path).
    dry_run: only plan, and publish the plan; change nothing.
    approve: apply a plan that destroys or replaces something without waiting for an operator (for CI).
    """
    the_site, platform = open_site(site, "provision-cluster")
    with site_guard(the_site):
        plan = platform.plan_provision()
        if dry_run:
            return publish_plan(the_site, "provision-cluster", plan.steps)
        if plan.destructive and not approve:
            publish(the_site, "provision-cluster-plan", plan_markdown(the_site, plan, waiting=True), f"plan for {the_site.name}: waiting for approval")
            await_approval(the_site, plan)
        else:
            publish(the_site, "provision-cluster-plan", plan_markdown(the_site, plan), f"plan for {the_site.name}: {plan.summary}")
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
