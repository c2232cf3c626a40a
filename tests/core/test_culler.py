"""The local hub's idle culler (core/culler.py), the real jupyterhub_idle_culler under a parent
that starts it as JupyterHub starts a managed service: in a session of its own."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time

from core.runner import pid_alive, stop_process
from tests.conftest import REPO, free_port


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {seconds:.0f}s"
        time.sleep(0.05)


def test_the_culler_ends_with_its_hub_and_keeps_its_token_out_of_its_log(tmp_path):
    token = "olab-culler-token-" + secrets.token_hex(12)
    log = tmp_path / "hub.log"
    gone = f"http://127.0.0.1:{free_port()}/hub/api"  # nothing listens: every poll fails
    hub = textwrap.dedent(f"""
        import subprocess, sys, time
        with open({str(log)!r}, "ab") as out:
            culler = subprocess.Popen(
                [sys.executable, "-m", "core.culler", "--url={gone}", "--cull-every=1", "--timeout=60"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        print(culler.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", hub], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "JUPYTERHUB_API_TOKEN": token}, start_new_session=True)
    culler = None
    try:
        culler = int(parent.stdout.readline())
        # A failed poll of tornado's PeriodicCallback (a second after the first, at start),
        # whose log line names the callback with its arguments, the token among them.
        periodic = "Exception in callback functools.partial(<function cull_idle"
        wait_for(lambda: periodic in log.read_text(), 30, "failed periodic poll in the log")
        text = log.read_text()
        assert "api_token='***'" in text, text[-2000:]
        assert token not in text

        # The hub killed outright: its culler goes with it.
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not pid_alive(culler), 10, "end of the culler after its hub was killed")
    finally:
        stop_process(parent.pid, grace_seconds=1)
        if culler and pid_alive(culler):
            os.kill(culler, signal.SIGKILL)
