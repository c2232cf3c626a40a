"""Every lifecycle flow, run for real under the Prefect test harness.

Real environments are built (uv, from the lock file), real labs are executed
in them, and a real JupyterHub is started, spawns a user and renders a lab.
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client

from flows.build_image import build_image
from flows.deploy_hub import deploy_hub
from flows.provision_cluster import provision_cluster
from flows.release import release
from flows.stop_hub import stop_hub
from flows.test_notebooks import LabsFailed
from flows.test_notebooks import test_notebooks as run_labs
from core.config import load_site
from core.planning import StaleLock
from core.runner import pid_alive
from core.secrets import SecretStore
from core.state import load_state
from tasks.hub_api import HEALTH_USER
from tests.conftest import hub_pid

from tests.conftest import REPO  # noqa: E402

pytestmark = pytest.mark.slow  # runs flows on a Prefect server
LABS = sorted(p.stem for p in (REPO / "labs").glob("*.md") if p.name != "README.md")


def latest_artifact(key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
        )
    assert found, f"no artifact {key}"
    return found[0]


def test_provision_prepares_the_local_machine(make_site):
    path = make_site("prov")
    report = provision_cluster(site=str(path))
    assert report.ok
    site = load_site(str(path))
    for folder in (site.paths.hub, site.paths.homes, site.paths.logs, site.paths.backups):
        assert folder.is_dir()
    assert stat.S_IMODE(site.paths.secrets.stat().st_mode) == 0o600
    assert "provision-cluster" in latest_artifact("prov-provision-cluster").data


def test_build_skips_unchanged_inputs_and_rebuilds_a_changed_lock(make_site, tmp_path):
    context = tmp_path / "image"
    shutil.copytree(REPO / "images" / "olab-user", context)
    path = make_site("build", image={"context": str(context)})
    first = build_image(site=str(path))
    marker = Path(first.location) / ".olab-image.json"
    stamp = marker.stat().st_mtime_ns
    envs = sorted(Path(first.location).parent.iterdir())

    def build_tasks() -> int:
        # Counted on the session's server, which other tests' builds share: only the difference counts.
        with get_client(sync_client=True) as client:
            return len([t for t in client.read_task_runs(limit=200) if t.name.startswith("build-venv")])

    before = build_tasks()
    again = build_image(site=str(path))
    assert again == first
    assert marker.stat().st_mtime_ns == stamp, "an unchanged build must not rebuild"
    assert sorted(Path(first.location).parent.iterdir()) == envs
    assert "unchanged, nothing built" in latest_artifact("build-build-image").data
    assert build_tasks() == before, "an unchanged build must not even run the build task"

    lock = context / "requirements.lock"
    lock.write_text(lock.read_text() + "# a changed lock is a new image\n")
    changed = build_image(site=str(path))
    assert changed.digest != first.digest
    assert (Path(changed.location) / "bin" / "jupyterhub-singleuser").exists()
    assert "built" in latest_artifact("build-build-image").data

    (context / "requirements.in").write_text("numpy\n")
    with pytest.raises(StaleLock, match="regenerate it with `olab lock`"):
        build_image(site=str(path))


def test_labs_pass_in_the_image_and_are_not_rerun_unchanged(make_site):
    path = make_site("labs")
    # Passes are cached per (image, lab) across sites of this olab home: start cold.
    shutil.rmtree(load_site(str(path)).paths.lab_cache, ignore_errors=True)
    report = run_labs(site=str(path))
    assert report.passed
    assert sorted(r.lab for r in report.results) == LABS
    assert len(LABS) >= 4
    assert not any(r.cached for r in report.results)
    table = latest_artifact("labs-test-notebooks").data
    for lab in LABS:
        assert lab in table

    rerun = run_labs(site=str(path), image=report.image)
    assert all(r.cached and r.passed for r in rerun.results)
    assert rerun.seconds < report.seconds


def test_a_failing_lab_is_named_with_its_cell(make_site, broken_labs):
    path = make_site("broken", labs={"path": str(broken_labs)})
    with pytest.raises(LabsFailed) as info:
        run_labs(site=str(path))
    report = info.value.report
    by_lab = {r.lab: r for r in report.results}
    assert by_lab["radioactive_decay"].passed
    bad = by_lab["bad_pendulum"]
    assert bad.status == "failed"
    assert bad.failing_cell == 3
    assert bad.cell_excerpt == "period = 2 * np.pi * np.sqrt(L / g)"
    assert "AssertionError" in bad.error and "is not 1 s" in bad.error
    assert "bad_pendulum: failed in cell 3" in str(info.value)
    table = latest_artifact("broken-test-notebooks").data
    assert "bad_pendulum" in table and "AssertionError" in table


def test_a_failing_lab_stops_the_release_before_deploy(make_site, broken_labs, stop_hubs):
    path = make_site("blocked", labs={"path": str(broken_labs)})
    stop_hubs.append(path)
    with pytest.raises(LabsFailed):
        release(site=str(path))
    site = load_site(str(path))
    assert load_state(site).hub is None
    with pytest.raises(httpx.TransportError):
        httpx.get(site.hub_url, timeout=2)


def test_release_deploys_a_hub_that_spawns_and_renders_then_redeploy_is_a_no_op(make_site, stop_hubs):
    path = make_site("rel", hub={"admins": ["prof"]})
    stop_hubs.append(path)
    result = release(site=str(path))
    site = load_site(str(path))

    assert result.health.ok
    names = [c.name for c in result.health.checks]
    assert names == ["hub api", "create test user", "start server", "server status", "render lab in Voilà",
                     "dashboard in a browser", "stop server"]
    render = next(c for c in result.health.checks if c.name == "render lab in Voilà")
    assert "widget views" in render.detail
    assert result.hub.action == "start"
    assert httpx.get(f"{site.hub_url}/hub/api/").json()["version"].startswith("6.")
    # The health user's home got the labs, under the site's data folder.
    assert (site.paths.homes / HEALTH_USER / "labs" / "lorenz.ipynb").is_file()
    # The hub's database is private; no secret is in its config or command line.
    assert stat.S_IMODE((site.paths.hub / "jupyterhub.sqlite").stat().st_mode) == 0o600
    secrets = SecretStore(site.paths.secrets).load().values()
    config_text = (site.paths.hub / "jupyterhub_config.py").read_text() + (site.paths.hub / "olab-hub.json").read_text()
    pid = hub_pid(site)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    for secret in secrets:
        assert secret not in config_text and secret not in cmdline

    # Admin login with the stored password works; a wrong one does not.
    store = SecretStore(site.paths.secrets).load()
    with httpx.Client(base_url=site.hub_url, follow_redirects=False) as browser:
        browser.get("/hub/login")
        xsrf = browser.cookies.get("_xsrf")
        bad = browser.post("/hub/login", data={"username": "prof", "password": "wrong", "_xsrf": xsrf})
        assert bad.status_code == 403
        good = browser.post("/hub/login", data={"username": "prof", "password": store.admin_password.get_secret_value(), "_xsrf": xsrf})
        assert good.status_code == 302

    again = deploy_hub(site=str(path), image=result.image, check=False)
    assert again.action == "unchanged"
    assert hub_pid(site) == pid
    assert pid_alive(pid)

    assert stop_hub(site=str(path)) is True
    assert not pid_alive(pid)
    assert (site.paths.homes / HEALTH_USER / "labs" / "lorenz.ipynb").is_file(), "stop keeps user data"
    assert stop_hub(site=str(path)) is False


def test_a_changed_config_restarts_the_hub_in_place(make_site, stop_hubs):
    path = make_site("recfg")
    stop_hubs.append(path)
    image = build_image(site=str(path))
    first = deploy_hub(site=str(path), image=image, check=False)
    assert first.action == "start"
    first_pid = hub_pid(load_site(str(path)))
    data = yaml.safe_load(path.read_text())
    data["hub"]["admins"] = ["admin", "teacher"]
    path.write_text(yaml.safe_dump(data))
    second = deploy_hub(site=str(path), image=image, check=False)
    assert second.action == "restart"
    second_pid = hub_pid(load_site(str(path)))
    assert second_pid != first_pid and not pid_alive(first_pid)
    assert httpx.get(f"{second.url}/hub/api/").status_code == 200
