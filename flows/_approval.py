"""An operator's approval of a plan that destroys or replaces something: the plan as an
artifact, then the run paused until it is resumed in the Prefect UI with an answer (or the
flow's ``approve`` parameter, or a site setting that approves in advance)."""

from __future__ import annotations

from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.logging import get_run_logger

from core.config import Site
from core.models import InfraPlan
from core.planning import Refused
from flows._common import publish


class Approval(RunInput):
    """The operator's answer to a plan that destroys or replaces something."""

    approve: bool = False
    note: str = ""


def plan_markdown(site: Site, flow: str, plan: InfraPlan, *, waiting: bool = False) -> list[str]:
    rows = [f"| {s.verb} | {s.subject} | {s.detail} |" for s in plan.steps] or ["| (nothing) | | |"]
    head = [f"# {flow}: {site.name} ({plan.target}) plan", "", f"**{plan.summary}**", ""]
    if waiting:
        head += ["This plan destroys or replaces something: it waits for an approval (resume the run in the UI with approve).", ""]
    elif plan.approved_by:
        head += [f"Approved in advance by the site file (`{plan.approved_by}`).", ""]
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


def approved(site: Site, flow: str, plan: InfraPlan, approve: bool) -> None:
    """Publish ``plan`` as ``flow``'s plan artifact, and return once it may be carried out:
    at once when it destroys nothing or is approved (``approve``, or the site file in
    advance); else after an operator's approval (raises Refused when rejected or timed out)."""
    waiting = plan.destructive and not approve and not plan.approved_by
    publish(site, f"{flow}-plan", plan_markdown(site, flow, plan, waiting=waiting),
            f"plan for {site.name}: " + ("waiting for approval" if waiting else plan.summary))
    if waiting:
        await_approval(site, plan)
    elif plan.destructive:
        get_run_logger().info("plan approved in advance (%s): %s", plan.approved_by or "approve", plan.summary)
