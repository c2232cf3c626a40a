"""A flow run whose process died shows as Crashed in the UI within minutes, not Running for ever.

Prefect's flow engine sends a ``prefect.flow-run.heartbeat`` event every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds while a flow runs (a thread of the
flow's process: it stops when the process dies, however it dies). The server does
nothing with a missing heartbeat by itself; an automation does, as Prefect's guide
"How to detect and respond to zombie flows" sets it up: after a heartbeat of a run,
expect another (or the run's end) within :data:`DETECT_WITHIN_SECONDS`, else set the
run Crashed. olab makes that automation on every Prefect server its commands use
(once: it is found by name afterwards), and its flows send the same heartbeat every
:data:`HEARTBEAT_SECONDS` (Prefect's minimum is 30 s, its default 180 s) from the
lifecycle guard rather than from Prefect's engine, whose heartbeat thread made every run
end up to 1 s late (``core/heartbeat.py``).

The next flow on a site also marks a dead holder's runs Crashed at once
(``core.guard``); this covers the runs no later flow comes after.
"""

from __future__ import annotations

from datetime import timedelta

from core.heartbeat import HEARTBEAT_SECONDS

AUTOMATION_NAME = "olab: crash flow runs that stopped sending heartbeats"
# Three heartbeats missed: a process busy in a long C call still gets its heartbeat thread
# scheduled well within that (the GIL is released in I/O and in the C code olab calls).
DETECT_WITHIN_SECONDS = 3 * HEARTBEAT_SECONDS

_ENDS = ("Completed", "Failed", "Cancelled", "Crashed")


def settings() -> dict:
    """The Prefect settings olab's commands (and the runs they start) run with: no heartbeat
    from Prefect's engine; the lifecycle guard sends it (core/heartbeat.py)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    return {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}


def automation():
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=AUTOMATION_NAME,
        description=(
            f"Made by olab. A flow run that sent a heartbeat and then neither another one nor its end within "
            f"{DETECT_WITHIN_SECONDS} s has lost its process (killed, a reboot): it is set Crashed."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{end}" for end in _ENDS)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=DETECT_WITHIN_SECONDS),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"olab: no heartbeat for {DETECT_WITHIN_SECONDS} s; its process is gone (killed, or the machine restarted)",
            )
        ],
    )


def ensure_automation() -> bool:
    """Make olab's crash-detection automation on the current Prefect server if it has none
    of that name; returns whether it made one."""
    from prefect.automations import Automation

    try:
        Automation.read(name=AUTOMATION_NAME)
        return False
    except ValueError:
        pass
    automation().create()
    return True
