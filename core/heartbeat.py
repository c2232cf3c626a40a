"""Flow-run heartbeats that stop the moment a run's work ends.

Prefect's server marks nothing Crashed by itself when a run's process dies (kill -9, a
reboot); olab's automation (``olab/crash_detection.py``) does, when a run that sent a
``prefect.flow-run.heartbeat`` event sends neither another one nor its end in time. Prefect
3.9's flow engine sends those events from a thread that sleeps in 1 s steps and is joined
when the run ends (``prefect/flow_engine.py``, ``_send_heartbeats``): every flow run ended
0 to 1 s after its work, which was most of an unchanged ``olab build``. olab's commands turn
that heartbeat off (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` unset) and the lifecycle guard
(``core.guard``, which every lifecycle flow holds for all its work) beats instead, with the
same event for the same run, from a thread that waits on an event and so stops at once.

It beats whether or not Prefect's engine beats too: a deployment run that ``olab serve``
starts is a subprocess whose settings come from its environment, where "no heartbeat" cannot
be said (Prefect drops unset settings from it, so the engine beats at its default 180 s,
longer than the automation waits): the guard's beat is what keeps such a run from being
taken for dead. Two heartbeats are only two events.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HEARTBEAT_SECONDS = 30  # Prefect's minimum; its default is 180
_log = logging.getLogger(__name__)


def heartbeat_event(flow_run, flow_name: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The resource and related resources of a run's heartbeat, as Prefect's engine names them."""
    import prefect

    resource = {
        "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
        "prefect.resource.name": flow_run.name or "",
        "prefect.version": prefect.__version__,
    }
    related = []
    if flow_run.flow_id:
        related.append({"prefect.resource.id": f"prefect.flow.{flow_run.flow_id}", "prefect.resource.role": "flow",
                        "prefect.resource.name": flow_name})
    if flow_run.deployment_id:
        related.append({"prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                        "prefect.resource.role": "deployment"})
    related += [{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
                for tag in sorted(flow_run.tags or [])]
    return resource, related


@contextmanager
def beating(seconds: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """While the block runs, the current flow run's heartbeat: at once, then every
    ``seconds``; nothing outside a flow run."""
    from prefect.context import FlowRunContext
    from prefect.events import emit_event

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        yield
        return
    resource, related = heartbeat_event(context.flow_run, context.flow.name if context.flow else "")
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                emit_event(event="prefect.flow-run.heartbeat", resource=resource, related=related)
            except Exception:  # noqa: BLE001 - a missed beat is not the run's failure
                _log.debug("heartbeat not sent", exc_info=True)
            stop.wait(seconds)

    # The thread sees the run's settings (its API URL and credential), as Prefect's does.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,), daemon=True,
                              name="olab-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        # Emitting only queues the event: the join is immediate, and no beat follows the run's end.
        thread.join(timeout=2)
