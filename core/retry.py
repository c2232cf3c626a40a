"""Which failures are worth retrying: transient ones, never permanent ones."""

from __future__ import annotations

from typing import Any

import httpx
from prefect.tasks import exponential_backoff

from core.runner import CommandError


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
