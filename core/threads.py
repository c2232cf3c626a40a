"""Independent jobs at once on a thread pool: the one home for that in olab.

Each job runs in a copy of the caller's context (contextvars), so Prefect's run
logger and the site lock's re-entrancy follow it into the thread. Every job runs
to its end; the results come back in the jobs' order, and the first job (in that
order) that raised raises once all have ended.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any


def parallel(
    jobs: Sequence[Callable[[], Any]],
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """Run ``jobs`` on ``workers`` threads (default: one each); ``on_progress(done, total)``
    is called as each one finishes. Suits I/O and C code that releases the GIL (hashing,
    files, HTTP)."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers or len(jobs))) as pool:
        futures = [pool.submit(contextvars.copy_context().run, job) for job in jobs]
        for done, _ in enumerate(as_completed(futures), 1):
            if on_progress is not None:
                on_progress(done, len(futures))
    return [future.result() for future in futures]
