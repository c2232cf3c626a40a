"""Every lifecycle flow's dry run on a deployed site: it says what a real run would do,
publishes that as the flow's artifact, and changes nothing."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import httpx
import pytest

from core.config import load_site
from core.models import FlowPlan
from flows.build_image import build_image
from flows.deploy_hub import deploy_hub
from flows.provision_cluster import provision_cluster
from flows.release import release
from flows.restore import restore
from flows.stop_hub import stop_hub
from flows.teardown import teardown
from flows.test_notebooks import test_notebooks as run_labs
from tests.conftest import hub_pid
from tests.flows.test_lifecycle import latest_artifact

pytestmark = pytest.mark.slow  # runs flows on a Prefect server


# What the running hub itself writes while it runs, dry run or not: its log (every API
# request) and its live database (token activity). The hub's pid is compared instead.
LIVE_HUB_FILES = ("logs/hub.log", "hub/jupyterhub.sqlite")  # and the database's journal, while it writes


def tree_digest(*roots: Path) -> dict[str, tuple]:
    """Per path below the roots: type, mode, size, mtime and a content hash."""
    found: dict[str, tuple] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                if str(path.relative_to(root)).startswith(LIVE_HUB_FILES):
                    continue
                st = path.lstat()
                if stat.S_ISDIR(st.st_mode):
                    # A folder's own mtime moves with any entry made or removed in it (the
                    # database's journal, above); its entries are compared one by one.
                    found[str(path)] = (st.st_mode,)
                    continue
                content = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
                found[str(path)] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    return found


def settled_digest(*roots: Path, quiet: float = 2.0, limit: float = 60.0) -> dict[str, tuple]:
    """The digest once nothing has changed for ``quiet`` seconds: a user server the health check
    stopped may still be finishing its last writes (kernel history, runtime files) on a busy machine."""
    deadline = time.monotonic() + limit
    last = tree_digest(*roots)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = tree_digest(*roots)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the site's folders kept changing for {limit:.0f}s with no flow running")


@pytest.fixture
def deployed(make_site, one_lab, stop_hubs):
    """A released site with a restore point behind it, its hub running."""
    path = make_site("dry", labs=one_lab)
    stop_hubs.append(path)
    release(site=str(path))
    teardown(site=str(path))
    restore(site=str(path))
    return path, load_site(str(path))


def test_every_dry_run_names_what_it_would_do_and_changes_nothing(deployed):
    path, site = deployed
    pid = hub_pid(site)
    assert pid and site.paths.backups.is_dir() and any(site.paths.backups.iterdir())
    expected = {
        # flow: (run, words the plan artifact must show)
        "release": (lambda: release(site=str(path), dry_run=True), ["| reuse | venv olab-user:", "| skip | lab radioactive_decay |", "| leave | the hub at"]),
        "build-image": (lambda: build_image(site=str(path), dry_run=True), ["| reuse | venv olab-user:"]),
        "test-notebooks": (lambda: run_labs(site=str(path), dry_run=True), ["| skip | lab radioactive_decay |"]),
        "deploy-hub": (lambda: deploy_hub(site=str(path), dry_run=True), ["| leave | the hub at", "| check | the hub's health |"]),
        "provision-cluster": (lambda: provision_cluster(site=str(path), dry_run=True), ["| check | secret store |", "| check | port"]),
        "stop-hub": (lambda: stop_hub(site=str(path), dry_run=True), [f"| stop | the hub at {site.hub_url} and every user server | pid {pid} |"]),
        "teardown": (lambda: teardown(site=str(path), dry_run=True), ["| archive | 1 users and the hub's state |", f"| delete | {site.paths.runtime} |"]),
        "restore": (lambda: restore(site=str(path), dry_run=True), ["| leave | the data | the site is not torn down |"]),
    }
    for flow, (run, words) in expected.items():
        before = settled_digest(site.paths.runtime, site.paths.backups)
        plan = run()
        assert isinstance(plan, FlowPlan) and plan.flow == flow
        after = tree_digest(site.paths.runtime, site.paths.backups)
        changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        assert not changed, f"{flow}'s dry run changed the site: {changed}"
        assert hub_pid(site) == pid, f"{flow}'s dry run touched the hub"
        artifact = latest_artifact(f"dry-{flow}").data
        assert "(dry run: nothing was changed)" in artifact
        for word in words:
            assert word in artifact, f"{flow}'s plan lacks {word!r}:\n{artifact}"
    assert httpx.get(f"{site.hub_url}/hub/api/").status_code == 200
