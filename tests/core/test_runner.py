"""The command choke point: masking, streaming, timeouts, typed errors."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from core.files import atomic_write
from core.runner import (
    CommandError,
    ServerDidNotStart,
    ToolMissing,
    group_members,
    pid_alive,
    read_pid_file,
    run,
    start_background,
    start_server,
    stop_pid_file,
    stop_process,
)
from core.secrets import SecretStore


def test_output_streams_and_secrets_are_masked():
    seen = []
    env = {**os.environ, "TOKEN": "s3cr3t-value"}
    result = run([sys.executable, "-c", "import os; print('a'); print('token=' + os.environ['TOKEN'])"], env=env, secrets=["s3cr3t-value"], on_line=seen.append)
    assert seen == ["a", "token=****"]
    assert "s3cr3t-value" not in result.output


def test_failure_is_typed_and_masked():
    with pytest.raises(CommandError) as info:
        run([sys.executable, "-c", "import sys; print('bad hunter2'); sys.exit(3)"], secrets=["hunter2"])
    assert info.value.returncode == 3
    assert "hunter2" not in str(info.value) and "bad ****" in str(info.value)
    assert not info.value.timed_out


def test_timeout_kills_the_process_group():
    started = time.monotonic()
    with pytest.raises(CommandError) as info:
        run(["bash", "-c", "sleep 30 & sleep 30"], timeout=1)
    assert info.value.timed_out
    assert time.monotonic() - started < 10


def test_missing_tool_says_so():
    with pytest.raises(ToolMissing, match="no-such-tool-xyz is not installed"):
        run(["no-such-tool-xyz"])


def test_background_server_is_stopped_by_pid(tmp_path):
    pid = start_background([sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path, log_file=tmp_path / "log")
    assert pid_alive(pid)
    assert stat.S_IMODE((tmp_path / "log").stat().st_mode) == 0o600
    assert stop_process(pid, grace_seconds=5)
    assert not pid_alive(pid)


# A server that leaves a child in its group: the child ignores SIGTERM and outlives it.
LEAVES_A_CHILD = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
open(sys.argv[1], "w").write(str(child.pid))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(60)
"""

# A server whose first thread ends while another still runs (and then exits alone):
# /proc shows its first thread as a zombie the whole time.
FIRST_THREAD_ENDS = """
import ctypes, os, sys, threading, time
def last(): time.sleep(float(sys.argv[1])); os._exit(0)
threading.Thread(target=last).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def test_stopping_a_server_waits_for_what_it_left_in_its_group(tmp_path):
    child_file = tmp_path / "child"
    pid = start_background([sys.executable, "-c", LEAVES_A_CHILD, str(child_file)], cwd=tmp_path, log_file=tmp_path / "log")
    deadline = time.monotonic() + 20
    while not child_file.exists() or not child_file.read_text():
        assert time.monotonic() < deadline and pid_alive(pid)
        time.sleep(0.05)
    child = int(child_file.read_text())
    assert sorted(group_members(pid)) == sorted([pid, child])
    assert stop_process(pid, grace_seconds=5)
    # Returned: nothing of the group runs any more (the orphaned child may wait for init's reaping).
    assert not pid_alive(pid) and group_members(pid) == []
    assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_child_is_alive_until_its_last_thread_has_ended(tmp_path):
    pid = start_background([sys.executable, "-c", FIRST_THREAD_ENDS, "1.5"], cwd=tmp_path, log_file=tmp_path / "log")
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert pid_alive(pid)  # its first thread a zombie, its second still running
    deadline = time.monotonic() + 20
    while pid_alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()  # reaped by pid_alive itself, no zombie left


def test_secret_store_is_private_and_stable(tmp_path):
    store = SecretStore(tmp_path / "s" / "secrets.json")
    first = store.load_or_create()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert store.load_or_create() == first
    assert "*" in repr(first) and first.api_token.get_secret_value() not in repr(first)
    os.chmod(store.path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        store.load()


def test_atomic_write_never_exposes_a_private_file(tmp_path):
    target = tmp_path / "f"
    atomic_write(target, "x", mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_text() == "x"


def test_every_value_of_an_opened_secret_store_is_masked_without_being_named(tmp_path):
    secrets = SecretStore(tmp_path / "s" / "secrets.json").load_or_create()
    token = secrets.api_token.get_secret_value()
    password = secrets.admin_password.get_secret_value()
    seen: list[str] = []
    script = "import sys; print(sys.argv[1]); print('pw', sys.argv[2]); sys.exit(4)"
    with pytest.raises(CommandError) as info:
        run([sys.executable, "-c", script, token, password], on_line=seen.append)
    assert seen == ["****", "pw ****"]
    # Not in the error's message, its output tail, or the command line it names.
    text = str(info.value) + info.value.output_tail + " ".join(info.value.argv)
    assert token not in text and password not in text


def test_a_server_is_started_until_it_answers_and_stopped_by_its_pid_file(tmp_path):
    ready_file = tmp_path / "ready"
    pid_file = tmp_path / "srv.pid"
    script = f"import pathlib, time; time.sleep(0.5); pathlib.Path({str(ready_file)!r}).touch(); time.sleep(60)"
    pid = start_server([sys.executable, "-c", script], cwd=tmp_path, log_file=tmp_path / "srv.log",
                       ready=ready_file.exists, timeout=20, what="the test server", pid_file=pid_file)
    assert ready_file.exists() and read_pid_file(pid_file) == pid and pid_alive(pid)
    assert stop_pid_file(pid_file, grace_seconds=5)
    assert not pid_alive(pid) and not pid_file.exists()
    assert stop_pid_file(pid_file) is False


def test_a_server_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    script = "import sys; print('cannot bind: address in use'); sys.exit(1)"
    with pytest.raises(ServerDidNotStart, match="the test server exited while starting") as info:
        start_server([sys.executable, "-c", script], cwd=tmp_path, log_file=tmp_path / "srv.log",
                     ready=lambda: False, timeout=20, what="the test server")
    assert "cannot bind: address in use" in str(info.value)


def test_a_server_that_never_answers_is_stopped(tmp_path):
    with pytest.raises(ServerDidNotStart, match="did not answer within 1s"):
        start_server([sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path,
                     log_file=tmp_path / "srv.log", ready=lambda: False, timeout=1, what="the test server")


def test_output_through_a_file_is_streamed_private_and_masked(tmp_path):
    seen = []
    log = tmp_path / "out.log"
    result = run(["sh", "-c", "echo one; sleep 0.2; echo two s3cret; printf three"], on_line=seen.append,
                 secrets=["s3cret"], output_file=log)
    assert seen == ["one", "two ****", "three"] and result.output == "one\ntwo ****\nthree"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


@pytest.mark.parametrize("through_file", [False, True])
def test_a_command_outlives_its_callers_kill_only_when_its_output_goes_to_a_file(tmp_path, through_file):
    # The caller is killed (SIGKILL) while the command runs; the command writes once more,
    # then leaves a marker. Through a pipe, that write kills it (SIGPIPE); through a file, it
    # finishes (terraform so releases its state lock).
    import signal
    import subprocess

    marker, started = tmp_path / "finished", tmp_path / "started"
    caller = (
        "from pathlib import Path; from core.runner import run\n"
        f"run(['sh', '-c', 'touch {started}; sleep 1; echo after; echo ok > {marker}'], "
        f"output_file=Path({str(tmp_path / 'out.log')!r}) if {through_file} else None)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", caller], cwd=os.getcwd())
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.5)
    assert marker.exists() is through_file
