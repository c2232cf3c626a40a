"""The olab command as an operator uses it, and `olab serve` with the Prefect UI."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from olab import prefect_server
from olab.cli import main
from core.runner import pid_alive, stop_process
from tests.conftest import free_port

from tests.conftest import REPO  # noqa: E402
FLOWS = {"release", "build-image", "test-notebooks", "deploy-hub", "provision-cluster", "stop-hub", "teardown", "restore"}


@pytest.mark.slow
def test_provision_status_and_credentials(make_site, capsys):
    path = str(make_site("cli"))
    assert main(["provision", "--site", path]) == 0
    out = capsys.readouterr().out
    assert "ok  secret store" in out and "ok  port" in out

    assert main(["status", "--site", path]) == 0
    out = capsys.readouterr().out
    assert "site cli (local)" in out
    assert "image    none built yet" in out
    assert "hub      never deployed" in out
    assert "provision-cluster" in out and "Completed" in out

    assert main(["credentials", "--site", path]) == 0
    out = capsys.readouterr().out
    assert re.search(r"admins:\s+admin\s+password: \S{32,}", out)
    assert "sign up at http://127.0.0.1:" in out and "/hub/authorize" in out


@pytest.mark.slow
def test_a_failed_flow_exits_1_with_its_reason(make_site, capsys, tmp_path):
    path = str(make_site("nolabs", labs={"path": str(tmp_path / "nowhere")}))
    assert main(["test", "--site", path]) == 1
    err = capsys.readouterr().err
    assert "olab test: FAILED:" in err and "labs folder does not exist" in err


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 120) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"olab serve exited with {proc.returncode}"
        try:
            response = httpx.get(url, timeout=3)
            if response.status_code == 200:
                return response
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds}s")


@pytest.mark.slow
def test_serve_starts_the_ui_and_serves_every_deployment(make_site, tmp_path, monkeypatch):
    path = str(make_site("srv", schedules={"timezone": "Europe/Paris", "teardown": "30 18 * * 5", "restore": "15 6 * * 1"}))
    port = free_port()
    # Its own olab home: the Prefect server serve starts (and leaves up) is this test's.
    monkeypatch.setenv("OLAB_HOME", str(tmp_path / "home"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "olab.cli", "serve", "--site", path, "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    server_pid = None
    try:
        api = f"http://127.0.0.1:{port}/api"
        _wait_for(f"{api}/health", proc)
        assert "<html" in _wait_for(f"http://127.0.0.1:{port}/", proc).text.lower()
        # The server requires olab's credential, kept in the olab home's 0600 file (not on argv).
        auth = prefect_server.credential()
        assert httpx.post(f"{api}/deployments/filter", json={"limit": 1}, timeout=5).status_code == 401
        assert httpx.post(f"{api}/flow_runs/filter", json={"limit": 1}, timeout=5,
                          auth=("olab", "wrong")).status_code == 401
        user, _, password = auth.partition(":")
        client = httpx.Client(auth=(user, password), timeout=5)
        deadline = time.monotonic() + 120
        found = {}
        while time.monotonic() < deadline and {f"{name}" for name in FLOWS} - set(found):
            response = client.post(f"{api}/deployments/filter", json={"limit": 50})
            found = {d["name"]: d for d in response.json()}
            time.sleep(1)
        assert FLOWS <= set(found), f"deployments served: {sorted(found)}"
        release = found["release"]
        assert release["parameters"] == {"site": "srv"}
        assert "site" in release["parameter_openapi_schema"]["properties"]
        assert "site:srv" in release["tags"]
        # The weekend schedules come from the site file, in the site's timezone.
        crons = {
            name: [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in found[name]["schedules"]]
            for name in ("teardown", "restore")
        }
        assert crons == {"teardown": [("30 18 * * 5", "Europe/Paris")], "restore": [("15 6 * * 1", "Europe/Paris")]}
        assert found["deploy-hub"]["schedules"] == []
        # Another olab command on this machine runs its flow on the server serve started: it
        # starts no other, no temporary one either, and the run shows in serve's UI.
        other = subprocess.run(
            [sys.executable, "-m", "olab.cli", "provision", "--site", path],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert other.returncode == 0, other.stderr
        assert "started olab's Prefect server" not in other.stderr
        assert "temporary server" not in other.stderr + other.stdout
        runs = client.post(f"{api}/flow_runs/filter", json={"limit": 20}).json()
        assert any(r["parameters"].get("site") == path for r in runs), "the provision run is not on serve's server"
        # A deployed flow takes a site's name, never a path to a site file someone wrote.
        started = client.post(f"{api}/deployments/{found['stop-hub']['id']}/create_flow_run",
                              json={"parameters": {"site": str(tmp_path / "mine.yaml")}}).json()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = client.get(f"{api}/flow_runs/{started['id']}").json()["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
        assert state["type"] == "FAILED" and "takes a site name" in state["message"], state

        log.seek(0)
        match = re.search(rf"Prefect UI: http://127.0.0.1:{port} .*Prefect server, started, pid (\d+)", log.read())
        assert match, "serve did not say which Prefect server it started"
        server_pid = int(match.group(1))
        for pid in (proc.pid, server_pid):
            assert password not in Path(f"/proc/{pid}/cmdline").read_text(), "the credential is on a command line"
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
        # The server outlives serve: later commands and the UI go on using it.
        assert pid_alive(server_pid) and prefect_server.running().pid == server_pid, "serve stopped the Prefect server"
        assert main(["server", "stop"]) == 0
        assert not pid_alive(server_pid) and prefect_server.running() is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        recorded = prefect_server.read_record()
        for pid in {server_pid, recorded.pid if recorded else None} - {None}:
            if pid_alive(pid):
                stop_process(pid)


@pytest.mark.slow
def test_lock_regenerates_a_lock_that_build_image_accepts(make_site, tmp_path, capsys):
    from core.planning import REQUIREMENTS_IN, REQUIREMENTS_LOCK, check_lock

    context = tmp_path / "image"
    context.mkdir()
    (context / REQUIREMENTS_IN).write_text("six==1.16.0\n")
    path = str(make_site("lock", image={"context": str(context)}))
    assert main(["lock", "--site", path]) == 0
    lock = (context / REQUIREMENTS_LOCK).read_text()
    assert "six==1.16.0" in lock and "--hash=sha256:" in lock
    check_lock((context / REQUIREMENTS_IN).read_bytes(), lock, context / REQUIREMENTS_LOCK)
    (context / REQUIREMENTS_IN).write_text("six==1.16.0\nattrs\n")
    with pytest.raises(Exception, match="regenerate it with `olab lock`"):
        check_lock((context / REQUIREMENTS_IN).read_bytes(), lock, context / REQUIREMENTS_LOCK)


def test_doctor_asks_for_a_compiler_where_a_venv_environment_needs_one_for_root(make_site, capsys, monkeypatch, tmp_path):
    """The image lock pins ROOT, whose interpreter needs c++: a venv site on a machine without
    one is told to install g++; an image site is not (the image has its own)."""
    venv = str(make_site("docv", image={"builder": "venv"}))
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("uv", "configurable-http-proxy"):  # found, so only the compiler is missing
        found = shutil.which(tool)
        if found:
            (tools / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(tools))
    assert main(["doctor", "--site", venv]) == 1
    assert "c++              MISSING: the lock pins ROOT" in capsys.readouterr().out
    (tools / "c++").symlink_to("/bin/true")
    main(["doctor", "--site", venv])
    assert re.search(r"^  c\+\+ +\S+/c\+\+$", capsys.readouterr().out, re.M)


def test_doctor_names_the_builder_or_what_to_install(make_site, capsys, monkeypatch, tmp_path):
    path = str(make_site("doc", image={"builder": "auto"}))
    assert main(["doctor", "--site", path]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^builder  (buildah|docker|venv) \(image.builder: auto\)", out, re.M)
    # With no container tools on PATH, an explicit buildah site is told what to install.
    monkeypatch.setenv("PATH", str(tmp_path))
    path = str(make_site("doc2", image={"builder": "buildah"}))
    assert main(["doctor", "--site", path]) == 1
    out = capsys.readouterr().out
    assert "builder  MISSING: image.builder buildah: buildah and podman not installed: apt-get install buildah podman" in out
