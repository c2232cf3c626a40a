"""The local hub's idle culler (core/culler.py), the real jupyterhub_idle_culler under a parent
that starts it as JupyterHub starts a managed service: in a session of its own."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core.runner import http_answers, pid_alive, start_server, stop_pid_file, stop_process
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
        assert "api_token='****'" in text, text[-2000:]
        assert token not in text

        # The hub killed outright: its culler goes with it.
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not pid_alive(culler), 10, "end of the culler after its hub was killed")
    finally:
        stop_process(parent.pid, grace_seconds=1)
        if culler and pid_alive(culler):
            os.kill(culler, signal.SIGKILL)


HUB_CONFIG = """
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_port}"
c.ConfigurableHTTPProxy.pid_file = {proxy_pid!r}
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.services = [{{"name": "idle-culler", "command": {command!r}}}]
c.JupyterHub.load_roles = [{{"name": "idle-culler", "services": ["idle-culler"],
                            "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"]}}]
"""


@pytest.mark.slow
def test_a_real_hub_keeps_its_culler_running_and_takes_it_along_when_killed(tmp_path):
    """JupyterHub starts the culler from its main thread (the death signal follows the thread
    that started it): it keeps running beside a live hub, and ends when the hub is killed."""
    if not shutil.which("jupyterhub"):
        pytest.skip("jupyterhub is not installed (pip install -e '.[test]')")
    port = free_port()
    command = [sys.executable, "-m", "core.culler", "--cull-every=1", "--timeout=60"]
    (tmp_path / "jupyterhub_config.py").write_text(HUB_CONFIG.format(
        port=port, hub_port=free_port(), proxy_port=free_port(), proxy_pid=str(tmp_path / "proxy.pid"), command=command))
    log = tmp_path / "hub.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    hub = start_server(["jupyterhub", "-f", "jupyterhub_config.py"], cwd=tmp_path, log_file=log, env=env,
                       ready=lambda: http_answers(f"http://127.0.0.1:{port}/hub/api/"), timeout=60, what="jupyterhub")
    try:
        wait_for(lambda: culler_of(tmp_path) is not None, 20, "culler beside the hub")
        culler = culler_of(tmp_path)
        time.sleep(3)  # three culls: it polls the live hub, and nothing ends it
        assert culler_of(tmp_path) == culler and pid_alive(culler)
        text = log.read_text()
        assert "exited with status" not in text, text[-2000:]
        assert text.count("GET /hub/api/users?state=[secret] (idle-culler@") >= 2, "the culler does not poll the hub"
        os.kill(hub, signal.SIGKILL)
        wait_for(lambda: not pid_alive(culler), 10, "end of the culler after its hub was killed")
    finally:
        stop_process(hub, grace_seconds=1)
        stop_pid_file(tmp_path / "proxy.pid")  # the hub's proxy, in a session of its own, outlives a killed hub
        for pid in [p for p in [culler_of(tmp_path)] if p]:
            os.kill(pid, signal.SIGKILL)


def culler_of(folder) -> int | None:
    """The running culler started in ``folder`` (JupyterHub runs services in its own folder)."""
    for entry in Path("/proc").iterdir():
        try:
            if b"core.culler" in (entry / "cmdline").read_bytes() and (entry / "cwd").resolve() == folder.resolve():
                if pid_alive(int(entry.name)):
                    return int(entry.name)
        except (OSError, ValueError):
            continue
    return None
