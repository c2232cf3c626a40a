"""prefect.yaml on a shared Prefect server: `prefect deploy --all` to the process work pool
`olab`, and a worker (as on another machine with the project checked out) runs a site's
release from `prefect deployment run`.

Everything is real: a Prefect server, the Prefect CLI, a process worker, and the release
of a local site (a venv user environment, its lab run, a JupyterHub and its health check).
"""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.config import load_site
from tests.conftest import REPO, free_port

FLOWS = {"release", "build-image", "test-notebooks", "deploy-hub", "provision-cluster", "stop-hub", "teardown", "restore"}
PREFECT = [sys.executable, "-m", "prefect"]


def _start(argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    # Its own process group, so that it and every process it starts are stopped together.
    with open(log, "w") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def _wait_for_health(api: str, server: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the Prefect server exited with {server.returncode}:\n{_tail(log)}"
        try:
            if httpx.get(f"{api}/health", timeout=3).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the Prefect server did not answer within {seconds}s:\n{_tail(log)}")


def _cli(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*PREFECT, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_worker_runs_the_release_deployment_of_a_local_site(make_site, one_lab, stop_hubs, olab_home, tmp_path):
    path = make_site("pool", labs=one_lab)
    stop_hubs.append(path)
    site = load_site(str(path))

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    # Only this test's server: no Prefect setting of the test session or the machine leaks in.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OLAB_"))}
    base |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    # No scheduler: the deployed weekend schedules (of the default site) must not fire mid-test.
    server_env = base | {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    client_env = base | {"PREFECT_API_URL": api}
    # The deploying shell may name its own checkout; the deployments must not carry it.
    deploy_env = client_env | {"OLAB_PROJECT": str(tmp_path / "the-deployers-checkout")}
    # The worker's machine: the project checked out at OLAB_PROJECT, olab's home (the test
    # session's, where built environments are cached). Polling every second keeps the test short.
    # A deployed flow takes a site *name* from the checkout's sites/, never a path: the worker's
    # checkout is this repository with the test's site among its sites.
    checkout = tmp_path / "worker-checkout"
    checkout.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("sites", ".git"):
            (checkout / entry.name).symlink_to(entry)
    (checkout / "sites").mkdir()
    shutil.copy(path, checkout / "sites" / f"{site.name}.yaml")
    worker_env = client_env | {"OLAB_PROJECT": str(checkout), "OLAB_HOME": str(olab_home), "PREFECT_WORKER_QUERY_SECONDS": "1"}

    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    server = _start([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_log, server_env, tmp_path)
    worker = None
    try:
        _wait_for_health(api, server, server_log)

        created = _cli(["work-pool", "create", "olab", "--type", "process"], client_env, tmp_path, 120)
        assert created.returncode == 0, created.stdout + created.stderr

        deployed = _cli(["--no-prompt", "deploy", "--all"], deploy_env, REPO, 300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        found = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={"limit": 50}, timeout=10).json()}
        assert set(found) == FLOWS, f"deployed: {sorted(found)}\n{deployed.stdout}"
        assert {d["work_pool_name"] for d in found.values()} == {"olab"}
        assert all("site" in d["parameter_openapi_schema"]["properties"] for d in found.values())
        assert found["release"]["parameters"] == {"site": "local"}
        assert found["release"]["description"] == "build-image -> test-notebooks -> deploy-hub -> health check"
        # The weekend schedules are real Prefect schedules, marked for `olab serve` by their slug.
        schedules = {
            name: [(s["schedule"]["cron"], s["schedule"]["timezone"], s["slug"], s["active"]) for s in found[name]["schedules"]]
            for name in ("teardown", "restore")
        }
        # Deployed paused: a shared server never tears down a site nobody chose.
        assert schedules == {
            "teardown": [("0 19 * * 5", "Europe/London", "site-teardown", False)],
            "restore": [("0 7 * * 1", "Europe/London", "site-restore", False)],
        }
        # Where a run starts is left to the worker's machine: nothing of the deployer's is baked in.
        pull = repr(found["release"]["pull_steps"])
        assert "{{ olab-project.stdout }}" in pull and "the-deployers-checkout" not in pull

        # The worker starts outside the project: its runs find the checkout through OLAB_PROJECT.
        worker_dir = tmp_path / "worker"
        worker_dir.mkdir()
        worker = _start([*PREFECT, "worker", "start", "--pool", "olab"], worker_log, worker_env, worker_dir)

        started = time.monotonic()
        run = _cli(
            ["deployment", "run", "release/release", "--param", f"site={site.name}", "--watch", "--watch-timeout", "1200"],
            client_env, tmp_path, 1300,
        )
        seconds = time.monotonic() - started
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\nworker log:\n{_tail(worker_log, 80)}"
        assert "Flow run finished successfully in 'Completed'" in run.stdout

        runs = httpx.post(
            f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [found["release"]["id"]]}}}, timeout=10
        ).json()
        assert len(runs) == 1
        assert runs[0]["state_type"] == "COMPLETED" and runs[0]["parameters"] == {"site": site.name}
        assert runs[0]["work_pool_name"] == "olab"
        assert f"submitting flow run '{runs[0]['id']}'" in worker_log.read_text(), "not run by the test's worker"
        # The release's own report, on the shared server: every health check passed.
        artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": ["pool-release"]}}}, timeout=10).json()
        assert artifacts, "the release published no artifact"
        report = artifacts[0]["data"]
        assert "# release: pool" in report and "| hub api | yes |" in report and "| NO |" not in report, report
        # And the hub it deployed answers.
        assert httpx.get(f"{site.hub_url}/hub/api/", timeout=10).json()["version"].startswith("6.")
        print(f"release through the work pool: {seconds:.1f}s")
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
    assert worker is not None and worker.poll() is not None and server.poll() is not None
