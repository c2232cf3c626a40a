"""Shared fixtures: a Prefect test server, an olab home, sites on free ports.

Servers a test starts (hubs) are stopped by pid when the test ends, passed or not.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server():
    """A Prefect test server (SQLite), started once for the tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _prefect_for_slow_tests(request):
    # The fast tier (-m "not slow") starts no server; a slow test gets the shared one.
    if request.node.get_closest_marker("slow"):
        request.getfixturevalue("prefect_server")


@pytest.fixture(scope="session", autouse=True)
def olab_home(tmp_path_factory) -> Path:
    """One olab home per test session: built environments are shared across tests."""
    home = Path(os.environ.get("OLAB_TEST_HOME") or tmp_path_factory.mktemp("olab-home"))
    os.environ["OLAB_HOME"] = str(home)
    os.environ["OLAB_PROJECT"] = str(REPO)
    return home


class SiteFactory:
    """Writes site files with their own runtime folder and free ports."""

    def __init__(self, root: Path):
        self.root = root
        self.count = 0

    def __call__(self, name: str | None = None, **sections) -> Path:
        self.count += 1
        name = name or f"t{self.count}"
        data = {
            "name": name,
            "target": "local",
            "runtime_dir": str(self.root / name / "runtime"),
            "hub": {"port": free_port(), "hub_api_port": free_port(), "proxy_api_port": free_port(), "start_timeout_seconds": 120},
            "image": {"context": str(REPO / "images" / "olab-user"), "builder": "venv"},
            "labs": {"path": str(REPO / "labs"), "cell_timeout_seconds": 120},
            "backups": {"path": str(self.root / name / "backups")},
        }
        for key, value in sections.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        path = self.root / name / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data))
        return path


def hub_pid(site) -> int | None:
    """The pid of a local site's running hub (the local target's own record)."""
    from tasks.local_hub import running_process

    found = running_process(site)
    return found.pid if found else None


@pytest.fixture
def make_site(tmp_path) -> SiteFactory:
    return SiteFactory(tmp_path)


@pytest.fixture
def stop_hubs():
    """Collects site files whose hubs must be stopped when the test ends."""
    from core.config import load_site
    from tasks.local_hub import stop_hub

    sites: list[Path] = []
    yield sites
    for path in sites:
        try:
            stop_hub(load_site(str(path)))
        except FileNotFoundError:
            pass


@pytest.fixture
def one_lab(tmp_path) -> dict:
    """The labs section of a site with one quick lab, which its health check renders."""
    folder = tmp_path / "one-lab"
    folder.mkdir()
    shutil.copy(REPO / "labs" / "radioactive_decay.md", folder / "radioactive_decay.md")
    return {"path": str(folder), "health_check_lab": "radioactive_decay"}


@pytest.fixture
def broken_labs(tmp_path) -> Path:
    """A labs folder with one good lab and one whose physics check fails."""
    folder = tmp_path / "broken-labs"
    folder.mkdir()
    shutil.copy(REPO / "labs" / "radioactive_decay.md", folder / "radioactive_decay.md")
    (folder / "bad_pendulum.md").write_text(BROKEN_LAB)
    return folder


BROKEN_LAB = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3 (ipykernel)
  language: python
  name: python3
---

# A pendulum with a wrong period

```{code-cell} ipython3
import numpy as np
g, L = 9.81, 1.0
```

```{code-cell} ipython3
period = 2 * np.pi * np.sqrt(L / g)
assert abs(period - 1.0) < 1e-3, f"period {period:.3f}s is not 1 s"
```

```{code-cell} ipython3
print("never reached")
```
"""
