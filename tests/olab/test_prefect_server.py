"""olab's Prefect server: started once by the first command that runs a flow, reused by the
next ones (same pid), not killed with a command, stopped by `olab server stop`, replacing a
stale record without a hang, requiring its credential; and no command starts Prefect's
temporary server.

The slow tests run the `olab` CLI in subprocesses with a clean environment (no Prefect API
configured, a fresh PREFECT_HOME whose default profile allows Prefect's temporary server),
each with its own OLAB_HOME, and stop every server they started by pid, passed or not.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from core.runner import pid_alive, stop_process
from olab import prefect_server
from olab.cli import main
from tests.conftest import REPO, free_port

# Prefect's own words when it starts its temporary server (prefect/server/api/server.py).
TEMPORARY_SERVER = "Starting temporary server on"
STARTED = "started olab's Prefect server at"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("OLAB_HOME", str(path))
    return path


@pytest.fixture
def servers(home):
    """Pids of Prefect servers a test started (the record's is added at the end): each is
    stopped when the test ends, if it is still olab's server."""
    pids: set[int] = set()
    yield pids
    if found := prefect_server.read_record():
        pids.add(found.pid)
    for pid in pids:
        if pid_alive(pid) and b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes():
            stop_process(pid)


@pytest.fixture
def env(home, tmp_path) -> dict[str, str]:
    """The environment of an operator's shell: no Prefect setting, this test's olab home; and
    no warm process (tests/olab/test_warm.py tests it; here it would only import for nothing)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return clean | {"OLAB_HOME": str(home), "PREFECT_HOME": str(tmp_path / "client-prefect-home"), "OLAB_NO_WARM": "1"}


def olab(env: dict[str, str], *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "olab.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def olab_background(env: dict[str, str], out: Path, *argv: str) -> subprocess.Popen:
    with open(out, "w") as sink:
        return subprocess.Popen([sys.executable, "-m", "olab.cli", *argv], cwd=REPO, env=env, stdout=sink,
                                stderr=subprocess.STDOUT)


def dry_stop(env: dict[str, str], site: str) -> subprocess.CompletedProcess:
    """A cheap command that runs a flow: stop-hub's dry run on a site with no hub."""
    done = olab(env, "stop", "--site", site, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dry run of stop-hub" in done.stdout
    assert TEMPORARY_SERVER not in done.stdout + done.stderr
    return done


def recorded_pid() -> int:
    found = prefect_server.read_record()
    assert found, "no record of olab's Prefect server"
    return found.pid


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {seconds:.0f}s"
        time.sleep(0.2)


def write_record(pid: int, port: int) -> None:
    folder = prefect_server.folder()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "server.json").write_text(json.dumps({
        "url": f"http://127.0.0.1:{port}/api", "pid": pid, "port": port,
        "started_at": datetime.now(timezone.utc).isoformat(),
    }))


@pytest.fixture
def sleeper():
    """A live process that is not a Prefect server: a record's pid after pid reuse."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


# --- without a server ------------------------------------------------------------------


def test_the_credential_is_made_once_private_and_refused_when_others_can_read_it(home):
    assert prefect_server.credential() is None
    made = prefect_server.credential(create=True)
    assert made.startswith("olab:") and len(made) > 30
    path = prefect_server.folder() / "credential"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(prefect_server.folder().stat().st_mode) == 0o700
    assert prefect_server.credential(create=True) == made == prefect_server.credential()
    assert [p.name for p in prefect_server.folder().iterdir()] == ["credential"], "a temporary file was left"
    path.chmod(0o644)
    with pytest.raises(prefect_server.PrefectServerError, match="mode 0644; run chmod 600"):
        prefect_server.credential()


def test_commands_that_need_no_prefect_start_nothing(home, make_site, capsys):
    assert main(["server", "status"]) == 1
    assert "not running" in capsys.readouterr().out
    assert main(["server", "stop"]) == 0
    assert "was not running" in capsys.readouterr().out
    site = str(make_site("quiet"))
    assert main(["credentials", "--site", site]) == 1
    assert "Prefect UI: not started yet" in capsys.readouterr().out
    assert main(["doctor", "--site", site]) in (0, 1)
    assert not prefect_server.folder().exists(), "a command that needs no Prefect made olab's Prefect folder"


def test_a_stale_record_is_not_a_server_and_stop_never_kills_a_pid_it_does_not_own(home, sleeper, capsys):
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_record(gone.pid, free_port())
    assert prefect_server.running() is None
    assert main(["server", "status"]) == 1
    assert "not running (stale record)" in capsys.readouterr().out

    # The pid is alive but is some other program now, and nothing answers on the port.
    write_record(sleeper.pid, free_port())
    started = time.monotonic()
    assert prefect_server.running() is None
    assert main(["server", "status"]) == 1
    assert main(["server", "stop"]) == 0
    assert time.monotonic() - started < 15
    assert f"named pid {sleeper.pid}, which is gone or not the server" in capsys.readouterr().out
    assert sleeper.poll() is None, "olab server stop killed a process that is not its server"
    assert prefect_server.read_record() is None


def test_no_temporary_server_can_start_under_olab(home):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    # Whatever the profile says (Prefect's default one allows it), a missing API is an error.
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_ENABLED: True}, restore_defaults={PREFECT_API_URL}):
        with prefect_server.using(None), pytest.raises(ValueError, match="No Prefect API URL provided"):
            get_client()


# --- with the real server ----------------------------------------------------------------


@pytest.mark.slow
def test_one_server_for_consecutive_commands_it_requires_the_credential_and_server_stop_stops_it(
    make_site, env, servers, tmp_path, capsys
):
    site = str(make_site("reuse"))
    # Two commands at once: one starts the server, the other waits for it (the start lock).
    started = time.monotonic()
    first = [olab_background(env, tmp_path / f"first-{i}.log", "stop", "--site", site, "--dry-run") for i in (1, 2)]
    for proc in first:
        proc.wait(300)
    first_seconds = time.monotonic() - started
    outputs = [(tmp_path / f"first-{i}.log").read_text() for i in (1, 2)]
    servers.add(recorded_pid())
    assert [p.returncode for p in first] == [0, 0], outputs
    assert sum(STARTED in out for out in outputs) == 1, outputs
    assert not any(TEMPORARY_SERVER in out for out in outputs)
    pid = recorded_pid()
    server = prefect_server.running()
    assert server and server.pid == pid and server.url.startswith("http://127.0.0.1:")

    started = time.monotonic()
    second = dry_stop(env, site)
    second_seconds = time.monotonic() - started
    assert STARTED not in second.stderr and recorded_pid() == pid
    print(f"\n[timing] two commands at once, starting the server: {first_seconds:.1f}s; "
          f"a command on the running server: {second_seconds:.1f}s")

    # The server requires olab's credential; it is on no command line and in no log.
    login = prefect_server.credential()
    user, _, password = login.partition(":")
    assert httpx.post(f"{server.url}/flows/filter", json={}, timeout=10).status_code == 401
    assert httpx.post(f"{server.url}/flows/filter", json={}, auth=(user, "wrong"), timeout=10).status_code == 401
    runs = httpx.post(f"{server.url}/flow_runs/filter", json={}, auth=(user, password), timeout=10)
    assert runs.status_code == 200 and len(runs.json()) == 3, "every command's run shows on the one server"
    assert password not in Path(f"/proc/{pid}/cmdline").read_text()
    assert password not in prefect_server.log_file().read_text()
    assert password not in "".join(outputs) + second.stdout + second.stderr
    assert prefect_server.folder().joinpath("home", "prefect.db").is_file(), "its SQLite is under $OLAB_HOME"

    status = olab(env, "server", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"pid      {pid}" in status.stdout and "healthy  yes" in status.stdout
    credentials = olab(env, "credentials", "--site", site)
    assert f"Prefect UI: {server.ui}  user: olab  password: {password}" in credentials.stdout

    stopped = olab(env, "server", "stop")
    assert stopped.returncode == 0 and f"stopped olab's Prefect server at {server.ui} (pid {pid})" in stopped.stdout
    assert not pid_alive(pid)
    status = olab(env, "server", "status")
    assert status.returncode == 1 and "not running" in status.stdout


@pytest.mark.slow
def test_a_killed_command_leaves_the_server_up_for_the_next(make_site, env, servers, tmp_path):
    site = str(make_site("killed"))
    # Killed while it starts the server: the server goes on starting, and the next command
    # waits for it rather than start another.
    starting = olab_background(env, tmp_path / "starting.log", "stop", "--site", site, "--dry-run")
    wait_until(lambda: prefect_server.read_record() is not None, 120, "the server's record was written")
    pid = recorded_pid()
    servers.add(pid)
    starting.send_signal(signal.SIGKILL)
    starting.wait()
    assert pid_alive(pid)
    after = dry_stop(env, site)
    assert STARTED not in after.stderr and recorded_pid() == pid

    # Killed in the middle of its flow.
    log = tmp_path / "midway.log"
    midway = olab_background(env, log, "stop", "--site", site, "--dry-run")
    wait_until(lambda: "Beginning flow run" in log.read_text(), 120, "the flow began")
    midway.send_signal(signal.SIGKILL)
    midway.wait()
    assert midway.returncode == -signal.SIGKILL
    assert prefect_server.running() is not None and recorded_pid() == pid
    again = dry_stop(env, site)
    assert STARTED not in again.stderr and recorded_pid() == pid
    assert TEMPORARY_SERVER not in log.read_text() + (tmp_path / "starting.log").read_text()


@pytest.mark.slow
def test_a_stale_record_is_replaced_without_a_hang(make_site, env, servers, sleeper, tmp_path):
    site = str(make_site("stale"))
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_record(gone.pid, free_port())
    # Port 4200 held by something else: the server takes a free port and records it.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", prefect_server.DEFAULT_PORT))
        holder.listen()
    except OSError:
        pass  # taken already: by something else, all the same
    try:
        started = time.monotonic()
        first = dry_stop(env, site)
        seconds = time.monotonic() - started
    finally:
        holder.close()
    assert STARTED in first.stderr
    replaced = prefect_server.read_record()
    servers.add(replaced.pid)
    assert replaced.pid != gone.pid and replaced.port != prefect_server.DEFAULT_PORT
    assert prefect_server.running() == replaced
    print(f"\n[timing] a command replacing a stale record (dead pid), starting the server: {seconds:.1f}s")
    assert olab(env, "server", "stop").returncode == 0
    assert not pid_alive(replaced.pid)

    # A live pid that is not the server (pid reuse), and nothing answering on the port.
    write_record(sleeper.pid, free_port())
    again = dry_stop(env, site)
    assert STARTED in again.stderr
    assert sleeper.poll() is None, "a process that only had the record's pid was killed"
    servers.add(recorded_pid())
    assert recorded_pid() not in (sleeper.pid, replaced.pid) and prefect_server.running() is not None


# A flow whose process the test kills outright, run with olab's Prefect settings: as every
# lifecycle flow, it does its work holding its site's guard, which sends its heartbeats.
DOOMED = """
import pathlib, sys, time
from prefect import flow
from prefect.runtime import flow_run
from core.config import load_site
from core.guard import site_guard
from olab import prefect_server

@flow(name="doomed")
def doomed():
    with site_guard(load_site("local")):
        pathlib.Path(sys.argv[1]).write_text(str(flow_run.id))
        time.sleep(600)

with prefect_server.using(prefect_server.running()):
    doomed()
"""


@pytest.mark.slow
def test_a_flow_run_killed_with_sigkill_shows_crashed_within_the_configured_time(env, servers, tmp_path):
    from olab import crash_detection

    dry_stop(env, "local")  # starts olab's server, which gets the crash-detection automation
    server = prefect_server.read_record()
    login = ("olab", prefect_server.credential().partition(":")[2])
    automations = httpx.post(f"{server.url}/automations/filter", json={}, auth=login, timeout=30).json()
    assert [a["name"] for a in automations] == [crash_detection.AUTOMATION_NAME], "made once, found afterwards"

    ids = tmp_path / "run-id"
    proc = subprocess.Popen([sys.executable, "-c", DOOMED, str(ids)], cwd=REPO, env=env)
    try:
        wait_until(ids.exists, 120, "the doomed flow starting")
        time.sleep(2)  # its first heartbeat goes out as it starts
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = time.monotonic()

    def state() -> dict:
        return httpx.get(f"{server.url}/flow_runs/{ids.read_text()}", auth=login, timeout=30).json()["state"]

    assert state()["type"] == "RUNNING", "a run killed outright says nothing: Prefect still shows it running"
    wait_until(lambda: state()["type"] == "CRASHED", crash_detection.DETECT_WITHIN_SECONDS + 60, "shown Crashed")
    took = time.monotonic() - killed
    assert took >= crash_detection.DETECT_WITHIN_SECONDS - 5, f"Crashed after {took:.0f}s, before its heartbeats were due"
    assert "no heartbeat" in state()["message"]


@pytest.mark.slow
def test_two_olab_homes_starting_at_once_on_one_port_each_get_their_own_server(tmp_path, servers):
    # Both see the port free and start; one server cannot bind it. That one's command must
    # neither take the other home's server for its own (its health probe needs no credential:
    # the CI's 401) nor fail: it starts again on a free port.
    port = free_port()
    code = ("import sys; from olab import prefect_server as p; s, _ = p.ensure_started(int(sys.argv[1])); "
            "print(s.pid, s.port, p.answers(s))")
    homes = [tmp_path / f"home-{i}" for i in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(port)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
                              | {"OLAB_HOME": str(h), "PREFECT_HOME": str(h / "client")})
             for h in homes]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for home in homes:
            record = home / "prefect" / "server.json"
            if record.is_file():
                servers.add(json.loads(record.read_text())["pid"])
    assert [p.returncode for p in procs] == [0, 0], outputs
    answers = [out.split()[-3:] for out in outputs]
    assert {a[1] for a in answers} != {str(port)} and str(port) in {a[1] for a in answers}, answers
    assert all(a[2] == "True" for a in answers) and answers[0][0] != answers[1][0], answers
