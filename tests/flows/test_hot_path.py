"""The hot path runs no flow it does not need (issue 14).

An unchanged image is reused without a build-image run, by release and by
test-notebooks; a changed one is still built, in a build-image subflow. Subflows
run without a heartbeat of their own (the parent's covers them).
"""

from __future__ import annotations

import shutil

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

from core.config import load_site
from core.state import load_state
from flows._common import subflow
from flows.release import release
from flows.test_notebooks import test_notebooks as run_labs
from tests.conftest import REPO
from tests.flows.test_lifecycle import latest_artifact


def test_a_subflow_runs_without_its_own_heartbeat_and_the_caller_keeps_its_own():
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        seen = subflow(lambda **kw: (kw, get_current_settings().flows.heartbeat_frequency), site="s")
        assert seen == ({"site": "s"}, None)
        assert get_current_settings().flows.heartbeat_frequency == 30


def child_flows(state) -> list[str]:
    """The names of the flows a run started as subflows."""
    parent = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
        return sorted(client.read_flow(run.flow_id).name for run in runs)


@pytest.mark.slow
def test_an_unchanged_image_is_reused_without_a_build_image_run_and_a_changed_one_is_built(
    make_site, tmp_path, one_lab, stop_hubs
):
    context = tmp_path / "image"
    shutil.copytree(REPO / "images" / "olab-user", context)
    path = make_site("hot", image={"context": str(context)}, labs=one_lab)
    stop_hubs.append(path)
    site = load_site(str(path))

    first = release(site=str(path), return_state=True)
    image = first.result().image
    assert child_flows(first) in (["deploy-hub", "test-notebooks"], ["build-image", "deploy-hub", "test-notebooks"])

    again = release(site=str(path), return_state=True)
    result = again.result()
    assert child_flows(again) == ["deploy-hub", "test-notebooks"], "an unchanged image needs no build-image run"
    assert result.image == image and load_state(site).image == image
    assert result.hub.action == "unchanged" and result.health.ok
    assert "unchanged, reused" in latest_artifact("hot-release").data

    labs = run_labs(site=str(path), return_state=True)
    assert child_flows(labs) == [], "test-notebooks on an unchanged image runs no subflow"
    assert labs.result().image == image and all(r.cached for r in labs.result().results)

    lock = context / "requirements.lock"
    lock.write_text(lock.read_text() + "# a changed lock is a new image\n")
    changed = release(site=str(path), return_state=True)
    result = changed.result()
    assert child_flows(changed) == ["build-image", "deploy-hub", "test-notebooks"]
    assert result.image.digest != image.digest and load_state(site).image == result.image
    assert result.hub.action == "restart" and result.health.ok
    assert not any(r.cached for r in result.labs.results), "the labs run again in the new image"
    assert "from build-image" in latest_artifact("hot-release").data
