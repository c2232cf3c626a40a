"""olab's flow-run heartbeat (core/heartbeat.py): the event Prefect's engine sends, for the
run that holds a lifecycle guard, from a thread that ends with the block, whether or not
the engine beats too. Against the test Prefect server."""

from __future__ import annotations

import threading
import time

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from core.heartbeat import beating

pytestmark = pytest.mark.slow


def heartbeats(run_id: str, at_least: int) -> list[dict]:
    """The heartbeat events the server holds for a run (waiting up to a minute for ``at_least``:
    events reach it through a queue)."""
    query = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                        "resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 50}
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            found = client._client.post("/events/filter", json=query).json()["events"]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@flow(name="beats")
def beats(seconds: float) -> tuple[str, list[str]]:
    from prefect.runtime import flow_run

    with beating(seconds=0.5):
        during = [t.name for t in threading.enumerate()]
        time.sleep(seconds)
    return str(flow_run.id), during


def test_a_guarded_run_beats_as_prefect_would_and_the_thread_ends_with_the_block():
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        run_id, during = beats(1.6)
    assert "olab-heartbeat" in during
    assert "olab-heartbeat" not in [t.name for t in threading.enumerate()], "the heartbeat outlived its block"
    found = heartbeats(run_id, 3)
    assert len(found) >= 3, found  # at once, then every 0.5 s
    event = found[0]
    assert event["resource"]["prefect.resource.id"] == f"prefect.flow-run.{run_id}"
    assert {r["prefect.resource.role"] for r in event["related"]} >= {"flow"}


def test_it_beats_when_prefects_engine_beats_too():
    # A deployment run's subprocess cannot be told "no engine heartbeat" (its settings come
    # from its environment, which drops unset ones): the engine beats at 180 s, past the
    # automation's 90 s, so the guard's beat must go on.
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180}):
        run_id, during = beats(1.6)
    assert "olab-heartbeat" in during
    assert len(heartbeats(run_id, 4)) >= 4  # the engine's one, and the guard's three or more


def test_outside_a_flow_run_it_does_nothing():
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), beating(seconds=0.1):
        assert "olab-heartbeat" not in [t.name for t in threading.enumerate()]
