"""The flows reach the target only through the seam: a recording platform, defined here,
answers from plain data while release, deploy, stop, teardown and restore run for real
on Prefect. Nothing of the local target may happen on the way."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

import targets
from core.config import Site, Target, load_site
from core.models import (
    Check,
    DataFacts,
    HubAccess,
    HubDeployment,
    HubPlan,
    HubSpec,
    HubState,
    ImageRef,
    InfraPlan,
    PlannedStep,
    ProvisionReport,
    RegistryAccess,
    RestorePointSummary,
    UserRestore,
)
from core.restore_points import RestorePoint, TeardownMark
from flows.deploy_hub import deploy_hub
from flows.provision_cluster import provision_cluster
from flows.release import release
from flows.restore import restore
from flows.stop_hub import stop_hub
from flows.teardown import teardown
from tests.fakes.hub import FakeHub

pytestmark = pytest.mark.slow  # runs flows on a Prefect server

TOKEN = "recorded-token-0123456789"


class RecordingPlatform:
    """Every seam call is recorded; answers come from the plain data below."""

    def __init__(self, site: Site, hub_url: str):
        self.site = site
        self.hub_url = hub_url
        self.calls: list[str] = []
        self.running_hash: str | None = None
        self.image: ImageRef | None = None
        self.torn_down = False
        self.points: dict[str, RestorePointSummary] = {}
        self.mark: TeardownMark | None = None

    def _call(self, name: str) -> None:
        self.calls.append(name)

    def not_ready(self, flow: str) -> str | None:
        return None

    def plan_provision(self) -> InfraPlan:
        self._call("plan_provision")
        return InfraPlan(target="recorded", summary="1 to create", steps=[PlannedStep(verb="create", subject="recorded")])

    def provision(self, plan: InfraPlan) -> ProvisionReport:
        self._call(f"provision:{plan.summary}")
        return ProvisionReport(site=self.site.name, target="recorded", checks=[Check(name="recorded", ok=True)])

    def image_registry(self, *, prepare: bool = True) -> RegistryAccess:
        self._call("image_registry")
        return RegistryAccess(address="127.0.0.1:1/recorded", insecure=True)

    def image_pushed(self, repository: str, digest: str) -> None:
        self._call("image_pushed")

    def image_known(self, repository: str, digest: str) -> bool:
        self._call("image_known")
        return True

    def plan_hub(self, spec: HubSpec) -> HubPlan:
        self._call("plan_hub")
        config_hash = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
        if self.running_hash is None:
            action = "start"
        else:
            action = "unchanged" if self.running_hash == config_hash else "restart"
        return HubPlan(action=action, config_hash=config_hash, url=self.hub_url, reason="recorded")

    def apply_hub(self, spec: HubSpec, plan: HubPlan) -> HubDeployment:
        self._call(f"apply_hub:{plan.action}")
        self.running_hash, self.image = plan.config_hash, spec.image
        return HubDeployment(url=self.hub_url, config_hash=plan.config_hash, image=spec.image, started_at=datetime.now(UTC), action=plan.action)

    def hub_state(self) -> HubState:
        self._call("hub_state")
        return HubState(running=self.running_hash is not None, url=self.hub_url, image=self.image, config_hash=self.running_hash)

    def hub_access(self) -> HubAccess:
        self._call("hub_access")
        return HubAccess(url=self.hub_url, token=TOKEN)

    def spawn_report(self, user: str) -> list[str]:
        self._call(f"spawn_report:{user}")
        return []

    def stop_hub(self) -> bool:
        self._call("stop_hub")
        was, self.running_hash = self.running_hash is not None, None
        return was

    def data_facts(self) -> DataFacts:
        self._call("data_facts")
        if self.torn_down:
            return DataFacts(exists=False, where="recorded")
        return DataFacts(exists=True, users=["ann", "bob"], files=4, bytes=40, where="recorded")

    def check_backup_room(self, needed_bytes: int) -> None:
        self._call(f"check_backup_room:{needed_bytes}")

    def save_user_data(self, point_id: str, users: list[str]) -> RestorePointSummary:
        self._call("save_user_data")
        self.points[point_id] = RestorePointSummary(id=point_id, users=users, files=4, bytes=40, image=self.image)
        return self.points[point_id]

    def verify_user_data(self, point_id: str) -> None:
        self._call("verify_user_data")

    def plan_release(self, point_id: str):
        self._call("plan_release")
        return None

    def release_runtime(self) -> None:
        self._call("release_runtime")
        self.torn_down = True

    def restore_points(self) -> list[RestorePoint]:
        self._call("restore_points")
        return [RestorePoint(id=p, path=Path("/recorded") / p, complete=True) for p in sorted(self.points)]

    def prune_restore_points(self, protect: set[str]) -> list[str]:
        self._call("prune_restore_points")
        return []

    def bring_back_user_data(self, point_id: str) -> list[UserRestore]:
        self._call("bring_back_user_data")
        return [UserRestore(user=u, files=2, bytes=20, verified=True) for u in self.points[point_id].users]

    def swap_in_restored(self) -> None:
        self._call("swap_in_restored")
        self.torn_down = False

    def restore_point_image(self, point_id: str) -> ImageRef | None:
        self._call("restore_point_image")
        return self.points[point_id].image

    def read_mark(self) -> TeardownMark | None:
        self._call("read_mark")
        return self.mark

    def write_mark(self, phase: str, point_id: str) -> None:
        self._call(f"write_mark:{phase}")
        self.mark = TeardownMark(phase=phase, restore_point=point_id, since=datetime.now(UTC))

    def clear_mark(self) -> None:
        self._call("clear_mark")
        self.mark = None

    def shutdown_savings(self) -> list[str]:
        self._call("shutdown_savings")
        return ["60 hours off a week (recorded)"]


@pytest.fixture
def recorded(make_site, one_lab, monkeypatch):
    path = make_site("seam", labs=one_lab)
    with FakeHub(TOKEN) as hub:
        platform = RecordingPlatform(load_site(str(path)), hub.url)
        monkeypatch.setitem(targets.PLATFORMS, Target.local, lambda site: platform)
        yield path, platform, hub


def take(platform: RecordingPlatform) -> list[str]:
    calls, platform.calls = platform.calls, []
    return calls


def test_the_lifecycle_runs_through_the_seam_alone(recorded):
    path, platform, hub = recorded
    site = load_site(str(path))

    assert provision_cluster(site=str(path)).ok
    assert take(platform) == ["plan_provision", "provision:1 to create"]

    result = release(site=str(path))
    assert result.health.ok and result.hub.action == "start"
    assert take(platform) == ["read_mark", "plan_hub", "apply_hub:start", "hub_access"]
    # The health check spoke the hub's REST API with the token the platform gave.
    assert ("POST", "/hub/api/users/olab-health/server") in hub.requests
    assert ("GET", "/user/olab-health/voila/render/labs/radioactive_decay.ipynb") in hub.requests

    again = deploy_hub(site=str(path), image=result.image, check=False)
    assert again.action == "unchanged"
    assert take(platform) == ["read_mark", "plan_hub", "apply_hub:unchanged"]

    assert stop_hub(site=str(path)) is True
    assert take(platform) == ["stop_hub"]
    deploy_hub(site=str(path), image=result.image, check=False)
    take(platform)

    report = teardown(site=str(path))
    assert report.users == ["ann", "bob"] and report.files == 4
    assert take(platform) == [
        "data_facts", "read_mark", "check_backup_room:40", "hub_state", "hub_access", "stop_hub",
        "save_user_data", "verify_user_data", "plan_release", "write_mark:deleting", "release_runtime", "write_mark:torn-down",
        "prune_restore_points", "shutdown_savings",
    ]

    back = restore(site=str(path))
    assert back.restore_point == report.restore_point and [u.user for u in back.users] == ["ann", "bob"]
    assert back.hub.image == result.image
    assert take(platform) == [
        "read_mark", "restore_points", "write_mark:restoring", "bring_back_user_data", "swap_in_restored",
        "restore_point_image", "clear_mark", "read_mark", "plan_hub", "apply_hub:start", "hub_access",
    ]

    # Nothing of the local target happened: no hub, no homes, no secret store, no hub log.
    for local_only in (site.paths.hub, site.paths.homes, site.paths.secrets, site.paths.logs, site.paths.backups):
        assert not local_only.exists(), f"{local_only} was made past the seam"
