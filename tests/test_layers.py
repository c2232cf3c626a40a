"""The layers as import-linter checks them: every import points down, and flows reach
a target only through the seam."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("olab", "flows", "targets", "tasks", "core")


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run(
        [str(lint) if lint.exists() else "lint-imports", "--config", str(project / "pyproject.toml"), "--no-cache"],
        cwd=project, env=env, capture_output=True, text=True, timeout=120,
    )


def copy_project(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_project_keeps_its_layers():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    project = copy_project(tmp_path / "project")
    (project / "core" / "sneaky.py").write_text("from flows.release import release  # core reaching up\n")
    result = lint_imports(project)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "core.sneaky -> flows.release" in result.stdout


def test_a_flow_calling_the_local_target_directly_breaks_the_seam(tmp_path):
    project = copy_project(tmp_path / "project")
    flow = project / "flows" / "stop_hub.py"
    flow.write_text(flow.read_text() + "\nfrom tasks.local_hub import stop_hub as _local_stop  # past the seam\n")
    result = lint_imports(project)
    assert result.returncode != 0
    assert "flows.stop_hub -> tasks.local_hub" in result.stdout
