"""The per-site concurrency guard: two lifecycle flows never run at once on one site.

It is a Prefect global concurrency limit of one slot per site, so it holds
across processes and machines that share a Prefect server. A flow that runs
another lifecycle flow as a subflow (release -> deploy-hub) already holds the
slot, so the guard is re-entrant within one run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from olab.logs import task_logger

from olab.config import Site

_held: ContextVar[frozenset[str]] = ContextVar("olab_site_guards", default=frozenset())


def limit_name(site: Site) -> str:
    return f"olab-site-{site.name}"


@contextmanager
def site_guard(site: Site, timeout_seconds: float | None = None) -> Iterator[None]:
    name = limit_name(site)
    if name in _held.get():
        yield
        return
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
    task_logger().info("taking the lifecycle lock of site %s", site.name)
    with concurrency(name, occupy=1, strict=True, timeout_seconds=timeout_seconds):
        token = _held.set(_held.get() | {name})
        try:
            yield
        finally:
            _held.reset(token)
