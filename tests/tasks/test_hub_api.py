"""The hub client against a real JupyterHub whose spawner is slow to start and slow to
unwind, as a container's start can be on a loaded machine."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap

import pytest

from core.runner import http_answers, pid_alive, start_server, stop_pid_file, stop_process
from tasks.hub_api import HubAPI
from tests.conftest import free_port

TOKEN = "olab-test-token-" + "0" * 24

# A start that takes START_SECONDS and, when cancelled, 2 s to unwind; its server is a
# plain HTTP server whose pid the spawner writes down. The hub answers a start that is
# not done after 0.5 s with 202, as it does after 10 s by default.
CONFIG = textwrap.dedent(
    """
    import asyncio, socket, subprocess, sys
    from pathlib import Path
    from jupyterhub.spawner import Spawner

    class SlowSpawner(Spawner):
        proc = None

        async def start(self):
            try:
                await asyncio.sleep({start_seconds})
            except asyncio.CancelledError:
                await asyncio.sleep(2)
                raise
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            Path("{pids}", self.user.name).write_text(str(self.proc.pid))
            return ("127.0.0.1", port)

        async def poll(self):
            return 0 if self.proc is None else self.proc.poll()

        async def stop(self, now=False):
            if self.proc is not None:
                self.proc.kill()
                self.proc.wait()
                self.proc = None

        def get_state(self):
            return {{}}

    c.JupyterHub.spawner_class = SlowSpawner
    c.JupyterHub.ip = "127.0.0.1"
    c.JupyterHub.port = {port}
    c.JupyterHub.hub_port = {hub_port}
    c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_port}"
    c.ConfigurableHTTPProxy.pid_file = "{proxy_pid}"
    c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0.5}}
    c.JupyterHub.authenticator_class = "dummy"
    c.Authenticator.allowed_users = {{"student01", "student02"}}
    c.JupyterHub.services = [{{"name": "olab", "api_token": "{token}"}}]
    c.JupyterHub.load_roles = [{{"name": "olab-operator", "scopes": ["admin:users", "admin:servers"],
                                "services": ["olab"]}}]
    """
)

START_SECONDS = 4


@pytest.fixture
def slow_hub(tmp_path):
    if not shutil.which("jupyterhub"):
        pytest.skip("jupyterhub is not installed (pip install -e '.[test]')")
    pids = tmp_path / "pids"
    pids.mkdir()
    port = free_port()
    (tmp_path / "jupyterhub_config.py").write_text(CONFIG.format(
        start_seconds=START_SECONDS, pids=pids, port=port, hub_port=free_port(), proxy_port=free_port(),
        proxy_pid=tmp_path / "proxy.pid", token=TOKEN,
    ))
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "hub.log"
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    pid = start_server(
        ["jupyterhub", "-f", "jupyterhub_config.py"], cwd=tmp_path, log_file=log, env=env,
        ready=lambda: http_answers(f"{url}/hub/api/"), timeout=60, what="jupyterhub",
    )
    try:
        yield url, pids, log
    finally:
        stop_process(pid)
        stop_pid_file(tmp_path / "proxy.pid")  # left by a hub that had to be killed


def server(api: HubAPI, name: str) -> dict | None:
    return api.user(name).get("servers", {}).get("")


@pytest.mark.slow
def test_a_server_still_starting_is_stopped_once_started_not_interrupted(slow_hub, caplog):
    caplog.set_level("INFO")
    url, pids, log = slow_hub
    with HubAPI(url, TOKEN) as api:
        assert api._client.post("/hub/api/users/student01/server").status_code == 202
        assert server(api, "student01")["pending"] == "spawn"
        api.stop_server("student01", timeout=30)
        assert server(api, "student01") is None

        # What teardown did before, for contrast: a DELETE while the start is under way
        # interrupts it, and a start that takes more than a second to unwind makes the hub
        # answer 500 (and leaves the server half there: listed, not running, not stoppable).
        assert api._client.post("/hub/api/users/student02/server").status_code == 202
        assert server(api, "student02")["pending"] == "spawn"
        assert api._client.delete("/hub/api/users/student02/server").status_code == 500

    assert "student01's server is starting; stopping it once it has started" in caplog.text
    assert "Interrupting spawner student01" not in log.read_text()
    assert not pid_alive(int((pids / "student01").read_text())), "student01's server is still running"
