"""The target seam: what a site's hub runs on, and every step that differs by target.

The flows call a :class:`Platform` and target-neutral tasks only; which
platform a site gets is decided in one place (``targets.platform_for``) from
``site.target``. Each target fills the same steps: this machine for
``local``, a GKE cluster for ``gke``.
"""

from __future__ import annotations

from typing import Protocol

from core.config import Site
from core.models import (
    DataFacts,
    HubAccess,
    HubDeployment,
    HubPlan,
    HubSpec,
    HubState,
    ImageRef,
    InfraPlan,
    ProvisionReport,
    RegistryAccess,
    RestorePointSummary,
    UserRestore,
)
from core.restore_points import RestorePoint, TeardownMark


class TargetNotReady(RuntimeError):
    """The site's target cannot do this step (yet); the message is one line saying why."""


class Platform(Protocol):
    site: Site

    def not_ready(self, flow: str) -> str | None:
        """Why this target cannot run ``flow`` yet (one line), or None when it can."""

    # What the hub runs on.
    def plan_provision(self) -> InfraPlan:
        """What provisioning would create, change or destroy; changes nothing."""

    def provision(self, plan: InfraPlan) -> ProvisionReport:
        """Carry out ``plan`` (exactly it), then check that what the hub runs on is ready."""

    def image_registry(self, *, prepare: bool = True) -> RegistryAccess:
        """Where the site's images go and how to log in there; with prepare, the registry
        is made ready to take a push (a local one started)."""

    def image_pushed(self, repository: str, digest: str) -> None:
        """Remember that olab pushed ``digest`` to ``repository`` (where the target keeps such a record)."""

    def image_known(self, repository: str, digest: str) -> bool:
        """Whether ``digest`` in ``repository`` may be reused as olab's own build: a registry
        that others on the machine could write to must hold only what olab pushed there."""

    # The hub.
    def plan_hub(self, spec: HubSpec) -> HubPlan:
        """What applying ``spec`` would do: start, restart, or leave the hub unchanged."""

    def apply_hub(self, spec: HubSpec, plan: HubPlan) -> HubDeployment:
        """Carry out ``plan``; returns what then runs."""

    def hub_state(self) -> HubState:
        """The hub as it is now: running, URL, version, what it serves."""

    def hub_access(self) -> HubAccess:
        """The hub's URL and the olab service token for its REST API (where secrets come from)."""

    def spawn_report(self, user: str) -> list[str]:
        """What the target says about ``user``'s server (its pod's events, the hub's log): for a
        failed health check's report."""

    def stop_hub(self) -> bool:
        """Stop the hub and every user server, keeping all data; whether one was running."""

    # Keeping and bringing back user data.
    def data_facts(self) -> DataFacts:
        """Users and the size of their data, as they are now."""

    def check_backup_room(self, needed_bytes: int) -> None:
        """Raise, before anything is stopped, when a restore point of this size cannot be written."""

    def save_user_data(self, point_id: str, users: list[str]) -> RestorePointSummary:
        """Write restore point ``point_id`` of every user's data and the hub's state."""

    def verify_user_data(self, point_id: str) -> None:
        """Read the restore point back, check it against what was written, make it durable and complete."""

    def plan_release(self, point_id: str) -> InfraPlan | None:
        """What releasing the runtime after restore point ``point_id`` would destroy, when an
        operator must approve it first (None: it needs no approval)."""

    def release_runtime(self) -> None:
        """Delete what the site ran on (only after its restore point is complete)."""

    def restore_points(self) -> list[RestorePoint]:
        """Every restore point of the site, complete or not."""

    def prune_restore_points(self, protect: set[str]) -> list[str]:
        """Apply the site's retention; returns the ids removed."""

    def bring_back_user_data(self, point_id: str) -> list[UserRestore]:
        """Unpack a restore point beside the runtime and verify every file (the runtime is not touched)."""

    def swap_in_restored(self) -> None:
        """Make the verified, unpacked restore point the site's runtime."""

    def restore_point_image(self, point_id: str) -> ImageRef | None:
        """The image the hub ran when the restore point was written."""

    def read_mark(self) -> TeardownMark | None:
        """Where an interrupted teardown or restore stood, if anywhere."""

    def write_mark(self, phase: str, point_id: str) -> None: ...

    def clear_mark(self) -> None: ...

    def shutdown_savings(self) -> list[str]:
        """What the weekend shutdown saves, as lines for its cost artifact (none where nothing is billed)."""
