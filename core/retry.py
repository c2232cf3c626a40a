"""Which failures are worth retrying: transient ones, never permanent ones."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from prefect.tasks import exponential_backoff

from core.logs import task_logger
from core.runner import CommandError

T = TypeVar("T")


class TransientError(RuntimeError):
    """A failure that may pass if tried again (a server still starting, say)."""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (TransientError, httpx.TransportError, TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    if isinstance(exc, CommandError):
        return exc.timed_out
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a task run only on a transient error."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify, not handle
        return is_transient(exc)
    return False


def retry_options(retries: int = 3, backoff: float = 2.0) -> dict[str, Any]:
    return {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=backoff),
        "retry_condition_fn": retry_transient,
    }


def call_with_backoff(
    what: str,
    fn: Callable[[], T],
    *,
    deadline: float,
    retries: int,
    backoff: float,
    transient: Callable[[BaseException], bool],
    describe: Callable[[BaseException], str],
    permanent: Callable[[BaseException], BaseException],
    unavailable: Callable[[str], BaseException],
    unwrap: Callable[[BaseException], BaseException] = lambda exc: exc,
    max_backoff: float = 30.0,
) -> T:
    """One call to an outside API, tried again on a transient error after backoff,
    2*backoff, ... (each at most ``max_backoff``, never past ``deadline``, at most
    ``retries`` times); a permanent error is raised at once as ``permanent(exc)`` makes it."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as raised:  # noqa: BLE001 - classified below
            exc = unwrap(raised)
            if not transient(exc):
                raise permanent(exc) from None
            attempt += 1
            delay = min(backoff * 2 ** (attempt - 1), max_backoff)
            if attempt > retries or time.monotonic() + delay > deadline:
                raise unavailable(f"{describe(exc)} ({what}: gave up after {attempt} attempts)") from None
            task_logger().warning("%s: %s; trying again in %.1fs (%d of %d)", what, describe(exc), delay, attempt, retries)
            time.sleep(delay)
