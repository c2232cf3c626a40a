"""What is deployed on a site, as recorded by the flows that deployed it."""

from __future__ import annotations

from pydantic import BaseModel

from olab.config import Site
from olab.files import write_json
from olab.models import HealthReport, HubDeployment, ImageRef


class SiteState(BaseModel):
    image: ImageRef | None = None
    hub: HubDeployment | None = None
    health: HealthReport | None = None


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
