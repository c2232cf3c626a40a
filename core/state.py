"""What is deployed on a site, as recorded by the flows that deployed it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from core.config import Site
from core.files import write_json
from core.models import HealthReport, HubDeployment, ImageRef
from core.restore_points import TeardownMark


class SiteState(BaseModel):
    image: ImageRef | None = None
    hub: HubDeployment | None = None
    health: HealthReport | None = None
    infra: dict[str, str] = {}  # what provision-cluster made (gke: terraform's public outputs)


def load_state(site: Site) -> SiteState:
    path = site.paths.state
    if not path.exists():
        return SiteState()
    return SiteState.model_validate_json(path.read_text())


def save_state(site: Site, state: SiteState) -> None:
    write_json(site.paths.state, state.model_dump(mode="json"))


def update_state(site: Site, **changes) -> SiteState:
    state = load_state(site).model_copy(update=changes)
    save_state(site, state)
    return state


def mark_path(site: Site) -> Path:
    """Beside the restore points, so it outlives the runtime it describes."""
    return site.paths.backups / "teardown.json"


def read_mark(site: Site) -> TeardownMark | None:
    path = mark_path(site)
    return TeardownMark.model_validate_json(path.read_text()) if path.exists() else None


def write_mark(site: Site, phase: str, restore_point: str) -> None:
    mark = TeardownMark(phase=phase, restore_point=restore_point, since=datetime.now(UTC))
    write_json(mark_path(site), mark.model_dump(mode="json"))


def clear_mark(site: Site) -> None:
    mark_path(site).unlink(missing_ok=True)
