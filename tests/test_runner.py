"""The command choke point: masking, streaming, timeouts, typed errors."""

from __future__ import annotations

import os
import stat
import sys
import time

import pytest

from olab.files import atomic_write
from olab.runner import CommandError, ToolMissing, pid_alive, run, start_background, stop_process
from olab.secrets import SecretStore


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
