"""A Prefect server restart leaves a flow inside its site's lock running: the lock is a file
lock, and the UI's mirror of it holds no lease that a restarted server would have forgotten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.config import load_site
from core.guard import limit_name, read_holder
from core.runner import http_answers, pid_alive, start_server, stop_process
from tests.conftest import REPO, free_port
from tests.core.test_guard import wait_for_file

pytestmark = pytest.mark.slow  # starts (and restarts) its own Prefect server

# A generic lifecycle flow: inside the site's lock it says so, waits for the test's go
# file, then writes its result. It exits 0 only if Prefect recorded it as completed.
FLOW = """
import json, pathlib, sys, time
from prefect import flow
from prefect.runtime import flow_run
from core.config import load_site
from core.guard import site_guard

site_path, folder = sys.argv[1], pathlib.Path(sys.argv[2])

@flow(name="guarded-work")
def guarded_work() -> str:
    with site_guard(load_site(site_path)):
        (folder / "inside.tmp").write_text(json.dumps({"run_id": flow_run.id}))
        (folder / "inside.tmp").rename(folder / "inside")
        while not (folder / "go").exists():
            time.sleep(0.1)
        (folder / "result").write_text("the body ran to its end")
    return "done"

state = guarded_work(return_state=True)
print(f"final state: {state.type.value} {state.message!r}", flush=True)
sys.exit(0 if state.is_completed() else 1)
"""


def _start_prefect(port: int, home: Path, log: Path) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),  # its SQLite database, kept across the restart
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    return start_server(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=home, log_file=log, env=env, what="the Prefect server", timeout=120,
        ready=lambda: http_answers(f"http://127.0.0.1:{port}/api/health"),
    )


def test_a_prefect_server_restart_leaves_a_flow_inside_the_lock_running(make_site, tmp_path):
    site_path = make_site("restart")
    site = load_site(str(site_path))
    port, home, log = free_port(), tmp_path / "prefect-home", tmp_path / "prefect-server.log"
    api = f"http://127.0.0.1:{port}/api"
    home.mkdir()
    folder = tmp_path / "flow"
    folder.mkdir()

    def active_slots() -> int:
        return httpx.get(f"{api}/v2/concurrency_limits/{limit_name(site)}", timeout=10).json()["active_slots"]

    server = _start_prefect(port, home, log)
    proc = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= {"PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        proc = subprocess.Popen(
            [sys.executable, "-c", FLOW, str(site_path), str(folder)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        wait_for_file(folder / "inside", proc, timeout=120)
        run_id = json.loads((folder / "inside").read_text())["run_id"]
        assert active_slots() == 1, "the UI's limit does not show the held lock"

        stop_process(server)
        assert not pid_alive(server)
        time.sleep(5)  # the flow goes on without a server
        assert proc.poll() is None, f"the flow ended while the server was down:\n{proc.stdout.read()}"
        server = _start_prefect(port, home, log)
        # The restarted server still shows the lock: the mirror is in its database, not a lease.
        assert active_slots() == 1
        time.sleep(5)  # and the flow goes on with a server that knows none of its old leases
        assert proc.poll() is None, f"the flow ended after the restart:\n{proc.stdout.read()}"
        assert read_holder(site)["run_id"] == run_id

        (folder / "go").touch()
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
        assert (folder / "result").read_text() == "the body ran to its end"
        assert "final state: COMPLETED" in out, out
        state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]["type"]
        assert state == "COMPLETED", f"the restarted server recorded the run as {state}"
        assert active_slots() == 0
        assert read_holder(site) is None
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
        stop_process(server)
