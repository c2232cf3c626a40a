"""The per-site concurrency guard: two lifecycle flows never run at once on one site.

It is a Prefect global concurrency limit of one slot per site, so it holds
across processes that share a Prefect server. A flow that runs another
lifecycle flow as a subflow (release -> deploy-hub) already holds the slot, so
the guard is re-entrant within one run.

A process killed while holding the slot (a power cut, the OOM killer, the
crash tests) would leave it taken: Prefect's embedded server keeps leases in
memory and dies with that process. So each contender first records its pid in
``$OLAB_HOME/locks/<site>/``; when the slot is taken but every recorded
contender is dead, the slot is reclaimed. This is only done against a Prefect
server on this machine, where every contender is one of those pids.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path
from urllib.parse import urlparse

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency

from core.config import Site, olab_home
from core.logs import task_logger
from core.runner import pid_alive

_held: ContextVar[frozenset[str]] = ContextVar("olab_site_guards", default=frozenset())
POLL_SECONDS = 2.0
LEASE_SECONDS = 120.0


def limit_name(site: Site) -> str:
    return f"olab-site-{site.name}"


def _contenders(site: Site) -> Path:
    return olab_home() / "locks" / site.name


def _local_server() -> bool:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return not url or urlparse(url).hostname in ("127.0.0.1", "localhost", "::1", socket.gethostname())


def _reclaim_if_abandoned(client, name: str, site: Site, me: Path) -> None:
    limit = client.read_global_concurrency_limit_by_name(name)
    if limit.active_slots < 1 or not _local_server():
        return
    others = [p for p in _contenders(site).glob("*.pid") if p != me]
    if any(pid_alive(int(p.stem.split("-")[0])) for p in others):
        return
    task_logger().warning(
        "the lifecycle lock of site %s is held by no live process (a killed run); reclaiming it", site.name
    )
    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    for stale in others:
        stale.unlink(missing_ok=True)


@contextmanager
def site_guard(site: Site) -> Iterator[None]:
    name = limit_name(site)
    if name in _held.get():
        yield
        return
    folder = _contenders(site)
    folder.mkdir(parents=True, exist_ok=True)
    # One file per contender (pid, then thread), so threads of one process count too.
    me = folder / f"{os.getpid()}-{threading.get_ident()}.pid"
    me.write_text(socket.gethostname())
    stack = ExitStack()
    try:
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(name, 1)
            waiting = False
            while True:
                _reclaim_if_abandoned(client, name, site, me)
                try:
                    stack.enter_context(
                        concurrency(name, occupy=1, strict=True, timeout_seconds=POLL_SECONDS, lease_duration=LEASE_SECONDS)
                    )
                    break
                except TimeoutError:
                    if not waiting:
                        task_logger().info("site %s is busy with another lifecycle flow; waiting", site.name)
                        waiting = True
        task_logger().info("took the lifecycle lock of site %s", site.name)
        with stack:
            token = _held.set(_held.get() | {name})
            try:
                yield
            finally:
                _held.reset(token)
                task_logger().info("releasing the lifecycle lock of site %s", site.name)
    finally:
        me.unlink(missing_ok=True)
