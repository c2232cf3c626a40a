"""The per-site lock: lifecycle flows on one site never interleave, a waiter is told who is
in the way, a killed holder frees it at once, and the Prefect UI's mirror never decides."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect import flow

from core.config import Site, load_site
from core.guard import (
    WAIT_SECONDS,
    WAIT_VARIABLE,
    SiteBusy,
    holder_file,
    limit_name,
    lock_dir,
    lock_file,
    read_holder,
    site_guard,
    wait_limit,
)
from tests.conftest import REPO, free_port

# A process that takes a site's lock (in a flow named holder-flow, or outside any flow),
# says so in its ready file, and holds it until the go file appears.
HOLDER = """
import json, os, pathlib, sys, time
from core.config import load_site
from core.guard import site_guard

site_path, ready, go, mode = sys.argv[1:5]

def hold():
    with site_guard(load_site(site_path)):
        info = {"pid": os.getpid()}
        if mode == "flow":
            from prefect.runtime import flow_run
            info |= {"run_id": flow_run.id, "run_name": flow_run.name}
        pathlib.Path(ready + ".tmp").write_text(json.dumps(info))
        os.replace(ready + ".tmp", ready)
        while not os.path.exists(go):
            time.sleep(0.05)

if mode == "flow":
    from prefect import flow
    flow(name="holder-flow")(hold)()
else:
    hold()
"""

# A process that says it is about to ask for the lock, takes it, and counts in a shared
# counter file how many hold it at once (the counter has its own lock).
CONTENDER = """
import fcntl, json, os, sys, time
from core.config import load_site
from core.guard import site_guard

site_path, started, counter = sys.argv[1:4]

def count(step):
    with open(counter, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        state = json.loads(f.read() or "{}")
        state["now"] = state.get("now", 0) + step
        state["max"] = max(state.get("max", 0), state["now"])
        state["done"] = state.get("done", 0) + (step < 0)
        f.seek(0); f.truncate(); f.write(json.dumps(state))

site = load_site(site_path)
open(started, "w").close()
with site_guard(site):
    count(+1)
    time.sleep(0.4)
    count(-1)
"""


def _site(make_site, name: str) -> tuple[Path, Site]:
    path = make_site(name)
    return path, load_site(str(path))


def _start(script: str, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until ``path`` exists; fails, with the child's output, if the child ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended ({proc.returncode}) before {path.name}:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, f"no {path.name} within {timeout:.0f}s"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


@pytest.fixture
def holder(make_site, tmp_path):
    """Starts a process holding a site's lock; it lets go when the test creates its go file."""
    started: list[subprocess.Popen] = []

    def start(path: Path, mode: str = "plain", env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict, Path]:
        ready, go = tmp_path / f"ready-{len(started)}", tmp_path / f"go-{len(started)}"
        proc = _start(HOLDER, path, ready, go, mode, env=env)
        started.append(proc)
        wait_for_file(ready, proc)
        return proc, json.loads(ready.read_text()), go

    yield start
    for proc in started:
        _stop(proc)


def test_a_waiter_gives_up_at_the_limit_naming_the_holder(make_site, holder, monkeypatch, caplog):
    path, site = _site(make_site, "busy")
    proc, info, go = holder(path)
    record = read_holder(site)
    assert record is not None and record["pid"] == info["pid"] == proc.pid
    assert record["flow"] is None and record["run_id"] is None
    since = datetime.strptime(record["since"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - since).total_seconds()) < 120

    monkeypatch.setenv(WAIT_VARIABLE, "1.5")
    caplog.set_level("INFO", logger="olab")
    body_ran = False
    start = time.monotonic()
    with pytest.raises(SiteBusy) as raised:
        with site_guard(site):
            body_ran = True
    waited = time.monotonic() - start

    assert not body_ran
    assert 1.5 <= waited < 5, f"waited {waited:.1f}s for a limit of 1.5s"
    message = str(raised.value)
    named = (
        f"site busy: the lifecycle lock is held by a process outside any flow run "
        f"(pid {proc.pid} on host {socket.gethostname()}) since {record['since']}; waited "
    )
    assert message.startswith(named) and re.fullmatch(r"[23] s", message.removeprefix(named)), message
    # The waiter said whom it waits for before giving up.
    assert any(f"pid {proc.pid}" in r.getMessage() and "busy" in r.getMessage() for r in caplog.records)
    # The holder is unaffected and releases normally.
    go.touch()
    assert proc.wait(30) == 0, proc.stdout.read()
    assert not holder_file(site).exists()


def test_a_holder_killed_with_sigkill_frees_the_lock_at_once(make_site, holder, caplog):
    path, site = _site(make_site, "killed")
    proc, _, _ = holder(path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    # The killed holder had no chance to clean up: its record is still there.
    assert read_holder(site)["pid"] == proc.pid

    caplog.set_level("INFO", logger="olab")
    # Taken without waiting out the dead holder: a guard that waited would give up after 5 s.
    with site_guard(site, wait_seconds=5):
        assert read_holder(site)["pid"] == os.getpid()
    assert any(
        "ended without releasing" in r.getMessage() and f"pid {proc.pid}" in r.getMessage() for r in caplog.records
    ), "the next holder does not report the killed one"


def test_the_lock_is_reentrant_within_a_run_and_excludes_other_threads(make_site):
    _, site = _site(make_site, "reentrant")
    outcome: dict[str, object] = {}

    def other_thread(key: str) -> None:
        # A new thread starts with a fresh context: it is another run, not this one.
        try:
            with site_guard(site, wait_seconds=0):
                outcome[key] = "took it"
        except SiteBusy as exc:
            outcome[key] = exc

    with site_guard(site, wait_seconds=0):
        with site_guard(site, wait_seconds=0):  # a subflow of the same run: at once
            pass
        # Leaving the inner guard does not release the outer one.
        assert read_holder(site)["pid"] == os.getpid()
        t = threading.Thread(target=other_thread, args=("while held",))
        t.start()
        t.join(30)
    t = threading.Thread(target=other_thread, args=("after",))
    t.start()
    t.join(30)

    assert isinstance(outcome["while held"], SiteBusy), outcome
    assert f"pid {os.getpid()}" in str(outcome["while held"])
    assert outcome["after"] == "took it"


def test_the_holder_record_is_private_and_removed_on_release(make_site):
    _, site = _site(make_site, "record")
    with site_guard(site):
        record = read_holder(site)
        assert record["site"] == "record" and record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert lock_dir().stat().st_mode & 0o777 == 0o700
        assert lock_file(site).stat().st_mode & 0o777 == 0o600
        assert holder_file(site).stat().st_mode & 0o777 == 0o600
    assert not holder_file(site).exists()
    assert read_holder(site) is None

    # A body that fails releases it too.
    with pytest.raises(RuntimeError, match="boom"):
        with site_guard(site):
            raise RuntimeError("boom")
    assert not holder_file(site).exists()
    with site_guard(site, wait_seconds=0):
        pass


def test_waiters_on_a_freed_lock_take_it_one_at_a_time(make_site, tmp_path):
    path, site = _site(make_site, "contended")
    counter = tmp_path / "counter.json"
    counter.write_text("{}")
    waiters: list[subprocess.Popen] = []
    try:
        with site_guard(site):
            for i in range(2):
                waiters.append(_start(CONTENDER, path, tmp_path / f"started-{i}", counter))
            for i, proc in enumerate(waiters):
                wait_for_file(tmp_path / f"started-{i}", proc)
            time.sleep(0.5)  # both are polling the held lock
            assert json.loads(counter.read_text()) == {}, "a waiter got in while the lock was held"
        for proc in waiters:
            assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        for proc in waiters:
            _stop(proc)
    state = json.loads(counter.read_text())
    assert state == {"now": 0, "max": 1, "done": 2}, f"holders at once: {state}"


def test_the_wait_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(WAIT_VARIABLE, raising=False)
    assert wait_limit() == WAIT_SECONDS == 1800
    monkeypatch.setenv(WAIT_VARIABLE, "0")
    assert wait_limit() == 0
    for bad in ("soon", "-1", "inf"):
        monkeypatch.setenv(WAIT_VARIABLE, bad)
        with pytest.raises(ValueError, match=WAIT_VARIABLE):
            wait_limit()


def test_an_unreachable_prefect_server_only_warns(make_site, caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _, site = _site(make_site, "no-server")
    caplog.set_level("INFO", logger="olab")
    ran = False
    start = time.monotonic()
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        with site_guard(site):
            ran = True
    assert ran
    assert time.monotonic() - start < 15
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("may not show its lifecycle lock as taken" in w for w in warnings), warnings
    assert any("may not show its lifecycle lock as free" in w for w in warnings), warnings


class BusyPrefect:
    """A Prefect API on loopback that answers the mirror's calls as Prefect's server does
    (the limit from Prefect's own response type), but 503 to the first ``busy`` writes, as a
    SQLite server does while another write holds the database."""

    def __init__(self, name: str, busy: int):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from uuid import uuid4

        from prefect.client.schemas.objects import CsrfToken
        from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse

        now = datetime.now(UTC)
        limit = GlobalConcurrencyLimitResponse(id=uuid4(), created=now, updated=now, active=True, name=name,
                                               limit=1, active_slots=0, slot_decay_per_second=0.0)
        body = limit.model_dump_json().encode()
        # The client asks for a CSRF token before its first write.
        csrf = CsrfToken(id=uuid4(), created=now, updated=now, token="t", client="c",
                         expiration=now + timedelta(hours=1)).model_dump_json().encode()
        fake = self
        self.writes: list[int] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, payload: bytes = b"") -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                if self.path.startswith("/api/csrf-token"):
                    self._answer(200, csrf)
                elif self.path.endswith(f"/v2/concurrency_limits/{name}"):
                    self._answer(200, body)
                else:
                    self._answer(404, b'{"detail": "Not Found"}')

            def do_PATCH(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = 503 if len(fake.writes) < busy else 204
                fake.writes.append(status)
                self._answer(status, b'{"exception_message": "Service Unavailable"}' if status == 503 else b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("busy, shown", [(3, True), (20, False)])
def test_a_busy_server_is_retried_at_once_and_never_ends_the_flow(make_site, caplog, busy, shown):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import core.guard

    _, site = _site(make_site, f"busy-{busy}")
    caplog.set_level("INFO", logger="olab")
    fake = BusyPrefect(limit_name(site), busy)
    try:
        with temporary_settings({PREFECT_API_URL: fake.url}), site_guard(site):
            taken = list(fake.writes)
    finally:
        fake.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if shown:
        # Three 503s, then the lock shown taken; and shown free at the first try.
        assert taken == [503, 503, 503, 204] and fake.writes == taken + [204]
        assert not warnings
    else:
        # A server busy past every try: one warning each way, the flow goes on.
        assert taken == [503] * core.guard.MIRROR_ATTEMPTS
        assert any("may not show its lifecycle lock as taken" in w and "503" in w for w in warnings), warnings


# --- With a Prefect server ------------------------------------------------------------


def _active_slots(site: Site) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(limit_name(site)).active_slots


@pytest.mark.slow
def test_a_holder_in_a_flow_run_is_named_and_shown_in_the_prefect_ui(make_site, holder):
    from prefect.settings import PREFECT_API_URL

    path, site = _site(make_site, "flow-holder")
    proc, info, go = holder(path, "flow", env={"PREFECT_API_URL": PREFECT_API_URL.value()})
    record = read_holder(site)
    assert record["flow"] == "holder-flow" and record["run_id"] == info["run_id"]
    assert _active_slots(site) == 1, "the UI's limit does not show the held lock"

    with pytest.raises(SiteBusy) as raised:
        with site_guard(site, wait_seconds=1):
            pass
    message = str(raised.value)
    named = (
        f"site flow-holder: the lifecycle lock is held by holder-flow (run {info['run_name']!r} {info['run_id']}, "
        f"pid {proc.pid} on host {socket.gethostname()}) since {record['since']}; waited "
    )
    assert message.startswith(named) and re.fullmatch(r"[12] s", message.removeprefix(named)), message
    go.touch()
    assert proc.wait(60) == 0, proc.stdout.read()
    assert _active_slots(site) == 0


# A release-like flow: it takes the lock, then a subflow waits inside it (killed there).
PARENT_HOLDER = """
import json, os, pathlib, sys, time
from prefect import flow
from prefect.runtime import flow_run
from core.config import load_site
from core.guard import site_guard

site_path, ready, go = sys.argv[1:4]

@flow(name="holder-child")
def child(parent_id):
    pathlib.Path(ready + ".tmp").write_text(json.dumps({"parent": parent_id, "child": flow_run.id}))
    os.replace(ready + ".tmp", ready)
    while not os.path.exists(go):
        time.sleep(0.05)

@flow(name="holder-flow")
def parent():
    with site_guard(load_site(site_path)):
        child(flow_run.id)

parent()
"""


@pytest.mark.slow
def test_the_next_flow_marks_a_killed_holders_runs_crashed(make_site, tmp_path, caplog):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    path, site = _site(make_site, "crashed")
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = _start(PARENT_HOLDER, path, ready, go, env={"PREFECT_API_URL": PREFECT_API_URL.value()})
    try:
        wait_for_file(ready, proc)
        runs = json.loads(ready.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        _stop(proc)
    with get_client(sync_client=True) as client:
        before = {k: client.read_flow_run(v).state.type.value for k, v in runs.items()}
    assert before == {"parent": "RUNNING", "child": "RUNNING"}, "killed outright, Prefect still shows them running"

    caplog.set_level("INFO", logger="olab")
    with site_guard(site, wait_seconds=30):
        pass
    with get_client(sync_client=True) as client:
        after = {k: client.read_flow_run(v).state for k, v in runs.items()}
    assert {k: s.type.value for k, s in after.items()} == {"parent": "CRASHED", "child": "CRASHED"}
    assert f"pid {proc.pid}" in after["parent"].message
    assert any("marked Crashed in Prefect" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_a_stale_slot_in_prefect_blocks_nobody(make_site):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    _, site = _site(make_site, "stale-slot")
    # What a killed holder (or a restarted server with lost leases) leaves behind.
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(limit_name(site), 1)
        client.update_global_concurrency_limit(limit_name(site), GlobalConcurrencyLimitUpdate(active_slots=1))
    with site_guard(site, wait_seconds=0):
        assert _active_slots(site) == 1
    assert _active_slots(site) == 0


# --- Flows, in threads of one process --------------------------------------------------


# Prefect copies flow parameters, so the flows report through this module-level log.
LOG: list = []
# Flows on different sites meet here while both hold their own site's lock.
MEETING = threading.Barrier(2, timeout=60)


@flow(name="guarded-step")
def guarded_step(site: str, seconds: float, meet: bool = False) -> None:
    the_site = load_site(site)
    with site_guard(the_site):
        LOG.append(("start", site, time.monotonic()))
        if meet:
            MEETING.wait()
        with site_guard(the_site):  # re-entrant, as release -> deploy-hub needs
            time.sleep(seconds)
        LOG.append(("end", site, time.monotonic()))


@flow(name="guarded-parent")
def guarded_parent(site: str) -> str:
    with site_guard(load_site(site)):
        return guarded_child(site)


@flow(name="guarded-child")
def guarded_child(site: str) -> str:
    with site_guard(load_site(site)):
        return read_holder(load_site(site))["flow"]


def _run_together(*sites: str, meet: bool = False) -> list:
    LOG.clear()
    log = LOG
    threads = [threading.Thread(target=guarded_step, args=(s, 3.0, meet)) for s in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return log


def spans(log: list, site: str) -> list[tuple[float, float]]:
    starts = [t for kind, s, t in log if kind == "start" and s == site]
    ends = [t for kind, s, t in log if kind == "end" and s == site]
    return list(zip(sorted(starts), sorted(ends)))


@pytest.mark.slow
def test_two_flows_on_one_site_run_one_after_the_other(make_site):
    path = str(make_site("guard"))
    log = _run_together(path, path)
    (a_start, a_end), (b_start, b_end) = spans(log, path)
    assert a_end <= b_start, f"flows interleaved: {log}"


@pytest.mark.slow
def test_flows_on_different_sites_may_overlap(make_site):
    one, two = str(make_site("g1")), str(make_site("g2"))
    MEETING.reset()
    log = _run_together(one, two, meet=True)
    # Both reached the end only if each was inside its lock while the other was.
    assert len(spans(log, one)) == 1 and len(spans(log, two)) == 1, f"different sites were serialised: {log}"


@pytest.mark.slow
def test_a_subflow_runs_inside_its_parents_lock(make_site, monkeypatch):
    monkeypatch.setenv(WAIT_VARIABLE, "0")  # a subflow that had to wait would fail at once
    path = str(make_site("subflow"))
    # The record is the outermost flow's: the subflow did not take the lock again.
    assert guarded_parent(path) == "guarded-parent"
