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


class WaitProgress:
    """Logs a long wait's state ("cluster olab: PROVISIONING; pools ...") when it changes, at
    most every ``every`` seconds, and every ``heartbeat`` seconds when it does not."""

    def __init__(self, every: float, heartbeat: float = 60.0):
        self.log = task_logger()
        self.every = every
        self.heartbeat = heartbeat
        self.start = time.monotonic()
        self.last_line: str | None = None
        self.last_time = float("-inf")

    def __call__(self, line: str, *, final: bool = False) -> None:
        now = time.monotonic()
        changed = line != self.last_line
        if final or (changed and now - self.last_time >= self.every) or now - self.last_time >= self.heartbeat:
            self.log.info("%s (%.0fs)", line, now - self.start)
            self.last_line, self.last_time = line, now
