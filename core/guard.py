"""The per-site lifecycle lock: two lifecycle flows never run at once on one site.

The lock is an ``flock`` on ``$OLAB_HOME/locks/<site>.lock`` (folder 0700, file
0600), taken for the whole flow. The kernel ties it to the open file, so it is
released the moment its process ends, however it ends (kill -9, the OOM killer,
a power cut): there is nothing to reclaim, and it cannot be granted twice.
``flock`` rather than ``lockf``: its locks belong to the open file, not to the
process, so two threads of one process, each opening the file, exclude each
other too (the guard tests run two flows in threads), and closing some other
descriptor of the file does not drop it. The descriptor is not inherited by the
programs a flow starts (Python opens files non-inheritable; subprocess closes
the rest), so a hub a flow starts does not keep the lock; a ``fork`` without
``exec`` of a holder would share it until both end.

A flow that runs another lifecycle flow as a subflow (release -> deploy-hub)
already holds the lock, so the guard is re-entrant within one run: a ContextVar
names the locks held, and the subflow runs in its parent's context.

While the lock is held, ``<site>.holder.json`` next to it names the holder:
flow, Prefect flow run (id, name), pid, host and since when (UTC). It is
written (atomically) after the lock is taken and removed before it is
released; a holder that was killed leaves it behind, and the next holder
reports it, marks its Prefect flow run and that run's subflow runs Crashed if
they still show as running (a process killed outright never reports its end),
and overwrites it.

A waiter polls the lock, logs every 30 s whom it waits for, and gives up after
:data:`WAIT_SECONDS` (30 minutes; the environment variable
``OLAB_LOCK_WAIT_SECONDS`` overrides it, for operators and tests) with
:class:`SiteBusy`, one line naming the holder.

The Prefect global concurrency limit ``olab-site-<site>`` mirrors the lock for
the UI, and nothing else: it never decides who runs. olab used to hold the slot
itself, with ``prefect.concurrency.sync.concurrency(..., strict=True)``, and a
Prefect server restart then cancelled a running teardown. That context manager
takes the slot with a lease and renews it from a thread; in Prefect 3.9 a
renewal that fails three times (server down), or that the server answers
410 Gone, makes ``_handle_lease_renewal_failure`` call ``cancel()`` on a
``WatcherThreadCancelScope``, which injects ``CancelledError`` into the flow's
thread (``raise_on_lease_renewal_failure`` follows ``strict``). And a restarted
server knows no lease at all: the default lease storage
(``prefect.server.concurrency.lease_storage.memory``) lives in the server's
memory, while the limit's ``active_slots`` live in its database. So after a
restart every renewal is answered 410, releasing by lease is a silent no-op,
and the slot stays taken for ever (waiters then waited for ever); with a
non-strict lease, one that expired while the server was unreachable freed the
slot under a running flow. So the mirror holds no lease: once the file lock is
taken, the guard sets the limit's ``active_slots`` to 1, and to 0 just before
it releases the lock. Those are plain writes to the server's database, which a
restart keeps; nothing is renewed, so nothing can fail while the flow runs.
Only the holder of the file lock writes them, in lock order, so the mirror is
right unless a write failed (a warning; the flow goes on) or a holder was
killed (the UI shows the site busy until the next flow on it). Without a
Prefect server (``PREFECT_API_URL`` unset: a temporary server, whose UI nobody
sees) there is nothing to mirror.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.config import Site, olab_home
from core.files import write_json
from core.heartbeat import beating
from core.logs import task_logger
from core.runner import pid_alive

_held: ContextVar[frozenset[str]] = ContextVar("olab_site_guards", default=frozenset())

# How long a lifecycle flow waits for its site's lock: a teardown or a restore of a
# large class takes minutes, one that waits half an hour is better told who is in the way.
WAIT_SECONDS = 30 * 60.0
WAIT_VARIABLE = "OLAB_LOCK_WAIT_SECONDS"
# A non-blocking flock is one system call: polling often costs nothing and keeps a
# waiter's start prompt once the holder ends.
POLL_SECONDS = 0.25
REPORT_SECONDS = 30.0
# A mirror write to a sick server must not hold the flow up for a client's full retry
# schedule (minutes): each try bounded, and only a busy server's 503 tried again, after
# 0.05 s, 0.1 s, ... 0.8 s (1.55 s in all).
MIRROR_TIMEOUT_SECONDS = 10.0
MIRROR_ATTEMPTS = 6


class SiteBusy(RuntimeError):
    """Another lifecycle flow held the site's lock for longer than this one would wait."""


def limit_name(site: Site) -> str:
    """The Prefect global concurrency limit that shows the site's lock in the UI."""
    return f"olab-site-{site.name}"


def lock_dir() -> Path:
    return olab_home() / "locks"


def lock_file(site: Site) -> Path:
    return lock_dir() / f"{site.name}.lock"


def holder_file(site: Site) -> Path:
    return lock_dir() / f"{site.name}.holder.json"


def wait_limit() -> float:
    """Seconds a flow waits for its site's lock: ``OLAB_LOCK_WAIT_SECONDS`` or :data:`WAIT_SECONDS`."""
    raw = os.environ.get(WAIT_VARIABLE, "").strip()
    if not raw:
        return WAIT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{WAIT_VARIABLE}={raw!r}: give the seconds to wait for a site's lock (a number, 0 or more)")
    return value


def read_holder(site: Site) -> dict[str, Any] | None:
    """The holder record of the site's lock, if one is there (it may be a killed holder's)."""
    try:
        record = json.loads(holder_file(site).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _who(record: dict[str, Any]) -> str:
    flow = record.get("flow") or "a process outside any flow run"
    run = f"run {record.get('run_name')!r} {record['run_id']}, " if record.get("run_id") else ""
    return f"{flow} ({run}pid {record.get('pid')} on host {record.get('host')}) since {record.get('since')}"


def describe_holder(site: Site) -> str:
    """Who holds the site's lock, for a waiter's messages."""
    record = read_holder(site)
    if record is None:
        return f"an unrecorded holder (no {holder_file(site).name} yet)"
    if record.get("host") == socket.gethostname() and not pid_alive(record.get("pid")):
        # The record of a killed holder, and the lock taken since by one that has not written its own.
        return f"an unrecorded holder (the last record, of {_who(record)}, is of a process that has ended)"
    return _who(record)


def _holder_record(site: Site) -> dict[str, Any]:
    from prefect.context import FlowRunContext

    # From the run context, never from the API: it answers while the server is down.
    run = FlowRunContext.get()
    return {
        "site": site.name,
        "flow": run.flow.name if run and run.flow else None,
        "run_id": str(run.flow_run.id) if run and run.flow_run else None,
        "run_name": run.flow_run.name if run and run.flow_run else None,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _open_lock(site: Site) -> int:
    folder = lock_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o777 != 0o700:
        folder.chmod(0o700)
    fd = os.open(lock_file(site), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_mode & 0o777 != 0o600:
        os.fchmod(fd, 0o600)
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _wait_for(fd: int, site: Site, limit: float) -> None:
    if _try_lock(fd):
        return
    log = task_logger()
    start = time.monotonic()
    next_report = start
    while True:
        waited = time.monotonic() - start
        if waited >= limit:
            raise SiteBusy(
                f"site {site.name}: the lifecycle lock is held by {describe_holder(site)}; waited {waited:.0f} s"
            )
        if time.monotonic() >= next_report:
            log.info(
                "site %s is busy: its lifecycle lock is held by %s; waited %.0f of %.0f s",
                site.name, describe_holder(site), waited, limit,
            )
            next_report += REPORT_SECONDS
        time.sleep(min(POLL_SECONDS, limit - waited))
        if _try_lock(fd):
            log.info("site %s: took its lifecycle lock after waiting %.0f s", site.name, time.monotonic() - start)
            return


def _mirror(site: Site, *, held: bool) -> None:
    """Show the lock in the Prefect UI: the site's limit has one active slot while it is held.

    Any failure is a warning: the file lock decides, the mirror only shows it."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        return
    name = limit_name(site)
    try:
        with _mirror_client(api) as client:
            if held:
                found = _mirror_call(client, "GET", f"/v2/concurrency_limits/{name}")
                if found.status_code == 404:
                    _mirror_call(client, "POST", "/v2/concurrency_limits/", {"name": name, "limit": 1}).raise_for_status()
                elif found.raise_for_status().json().get("limit") != 1:
                    _mirror_call(client, "PATCH", f"/v2/concurrency_limits/{name}", {"limit": 1}).raise_for_status()
            done = _mirror_call(client, "PATCH", f"/v2/concurrency_limits/{name}", {"active_slots": int(held)})
            if done.status_code == 404:
                return  # releasing a limit someone deleted: nothing to show
            done.raise_for_status()
    except Exception as exc:  # noqa: BLE001 - the UI's mirror must never end the flow
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        task_logger().warning(
            "site %s: the Prefect UI may not show its lifecycle lock as %s%s (concurrency limit %s: %s); "
            "the lock itself holds",
            site.name, "taken" if held else "free", "" if held else " until the next flow on the site", name, reason,
        )


def _mirror_client(api: str):
    """A plain HTTP client for the run's Prefect API, with its credential. Not Prefect's
    client: that one sleeps 2 s after a 503 even when told not to retry (Prefect 3.9,
    ``prefect/client/base.py`` ``_send_with_retry`` sleeps before it checks the count), and a
    SQLite server answers 503 whenever another write holds the database (a log batch, an
    event): that cost a no-op command 2 s in 9 of 15 rounds."""
    import httpx
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    headers = {}
    auth = None
    if key := PREFECT_API_KEY.value():
        headers["Authorization"] = f"Bearer {key}"
    elif login := PREFECT_API_AUTH_STRING.value():
        user, _, password = login.partition(":")
        auth = (user, password)
    return httpx.Client(base_url=api.rstrip("/"), headers=headers, auth=auth, timeout=MIRROR_TIMEOUT_SECONDS)


def _mirror_call(client, method: str, path: str, body: dict | None = None):
    """One request, sent again at once (0.05 s, 0.1 s, ... apart) while the server is busy."""
    for attempt in range(MIRROR_ATTEMPTS - 1):
        response = client.request(method, path, json=body)
        if response.status_code != 503:
            return response
        time.sleep(0.05 * 2**attempt)
    return client.request(method, path, json=body)


def _crash_left_run(site: Site, record: dict[str, Any]) -> None:
    """Mark Crashed, in Prefect, the flow run of a holder that died holding the lock (and its
    subflow runs), if they still show as running: a process killed outright never reports its
    end, and the UI would show it Running for ever. The lock proves the holder is gone (the
    kernel freed it; a holder that ends any other way removes its record first).
    Any failure is a warning, as for the mirror."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
    from prefect.states import Crashed

    if not record.get("run_id") or not PREFECT_API_URL.value():
        return
    message = f"olab: its process (pid {record.get('pid')}) ended holding site {site.name}'s lock; found by the next flow on the site"
    try:
        run_id = UUID(record["run_id"])
        with (
            temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 1}),
            get_client(httpx_settings={"timeout": MIRROR_TIMEOUT_SECONDS}, sync_client=True) as client,
        ):
            runs = [client.read_flow_run(run_id)]
            runs += client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))
            crashed = []
            for run in runs:
                if run.state is not None and not run.state.is_final():
                    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                    crashed.append(run.name)
        if crashed:
            task_logger().warning("site %s: marked Crashed in Prefect: %s", site.name, ", ".join(crashed))
    except Exception as exc:  # noqa: BLE001 - bookkeeping for the UI must never end the flow
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        task_logger().warning("site %s: could not mark the dead holder's run %s Crashed in Prefect: %s",
                              site.name, record.get("run_id"), reason)


@contextmanager
def site_guard(site: Site, *, wait_seconds: float | None = None) -> Iterator[None]:
    """Hold the site's lifecycle lock for the block; re-entrant within one run.

    Waits up to ``wait_seconds`` (default: :func:`wait_limit`) for another holder,
    then raises :class:`SiteBusy` naming it."""
    name = limit_name(site)
    if name in _held.get():
        yield
        return
    limit = wait_limit() if wait_seconds is None else wait_seconds
    log = task_logger()
    # The run's heartbeat (core/heartbeat.py) from before it waits for the lock until the
    # lock is released: every lifecycle flow does all its work in here.
    with beating():
        yield from _guarded(site, name, limit, log)


def _guarded(site: Site, name: str, limit: float, log) -> Iterator[None]:
    fd = _open_lock(site)
    try:
        _wait_for(fd, site, limit)
        try:
            left = read_holder(site)
            if left is not None:
                log.warning(
                    "site %s: the last lifecycle flow on it, %s, ended without releasing its lock (killed?); "
                    "its work may be half done",
                    site.name, _who(left),
                )
                _crash_left_run(site, left)
            write_json(holder_file(site), _holder_record(site), mode=0o600)
            log.info("took the lifecycle lock of site %s", site.name)
            _mirror(site, held=True)
            token = _held.set(_held.get() | {name})
            try:
                yield
            finally:
                _held.reset(token)
                log.info("releasing the lifecycle lock of site %s", site.name)
                _mirror(site, held=False)
        finally:
            holder_file(site).unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock
