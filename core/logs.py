"""Task logging that works in a Prefect run and in a plain script alike."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def task_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("olab")


def progress(logger, what: str, every: float = 5.0) -> Callable[[int, int], None]:
    """A callback(done, total) that logs "<what>: done of total" at most every
    ``every`` seconds, and always at the end: long teardowns show they move."""
    last = time.monotonic()

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if done == total or now - last >= every:
            last = now
            logger.info("%s: %d of %d", what, done, total)

    return report
