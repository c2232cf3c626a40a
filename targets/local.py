"""The local target: the hub, its users' servers and their data on this machine.

Today's local lifecycle behind the seam of ``core.platform``: a JupyterHub
process (``tasks.local_hub``), the site's runtime folder (``tasks.host``) and
restore points in a backup folder (``tasks.backup``).
"""

from __future__ import annotations

import os

from core import sealing
from core.config import Site
from core.files import content_hash
from core.logs import task_logger
from core.models import (
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
from core.planning import plan_hub
from core.restore_points import Manifest, RestorePoint, TeardownMark
from core.runner import mask
from core.secrets import SecretStore
from core.state import clear_mark, load_state, read_mark, write_mark
from tasks import backup, host, local_hub
from tasks.hub_api import hub_version
from tasks.notebooks import stage_index, stage_lab
from tasks.oci import Engine, engine_for, insecure_registries
from tasks.local_registry import ensure_local_registry, pushed_by_olab, record_pushed, registry_login


class LocalPlatform:
    def __init__(self, site: Site):
        self.site = site
        self._manifests: dict[str, Manifest] = {}

    def not_ready(self, flow: str) -> str | None:
        return None

    # What the hub runs on: this machine.
    def plan_provision(self) -> InfraPlan:
        checks = host.prepare_local_host(self.site, dry_run=True)
        steps = [PlannedStep(verb="prepare" if c.planned else "check", subject=c.name, detail=c.detail) for c in checks]
        planned = sum(c.planned for c in checks)
        return InfraPlan(target="local", summary=f"{planned} to create on this machine", steps=steps, changes=planned > 0)

    def provision(self, plan: InfraPlan) -> ProvisionReport:
        checks = host.prepare_local_host(self.site)
        return ProvisionReport(site=self.site.name, target=self.site.config.target.value, checks=checks)

    def image_registry(self, *, prepare: bool = True) -> RegistryAccess:
        image = self.site.config.image
        if not image.local_registry:
            return RegistryAccess(address=image.registry, insecure=False)
        if prepare:
            ensure_local_registry(self.site.paths.containers, image.registry)
        # olab's own registry requires olab's credential (tasks/local_registry.py).
        return RegistryAccess(address=image.registry, insecure=True, login=registry_login(self.site.paths.containers))

    def image_pushed(self, repository: str, digest: str) -> None:
        if self.site.config.image.local_registry:
            record_pushed(self.site.paths.containers, repository, digest)

    def image_known(self, repository: str, digest: str) -> bool:
        """On olab's own registry, only what olab pushed (a registry someone else started on
        that port could answer a content tag with any digest)."""
        if not self.site.config.image.local_registry:
            return True
        return pushed_by_olab(self.site.paths.containers, repository, digest)

    # The hub.
    def _engine(self, image) -> Engine:
        return engine_for(image.builder, self.site.paths.containers, insecure_registries(self.site))

    def _render(self, spec: HubSpec) -> tuple[dict, str, str]:
        image = spec.image
        settings = local_hub.render_settings(
            self.site,
            spec,
            proxy_command=local_hub.proxy_command(),
            run_as_root=os.geteuid() == 0,
            docker_socket=Engine(builder=image.builder, store=self.site.paths.containers).socket if image.is_oci else None,
            gateway=self._engine(image).bridge_gateway(local_hub.BRIDGE_NETWORK) if image.is_oci else None,
        )
        template = local_hub.hub_template()
        labs_hash = content_hash((lab.name, lab.content_hash.encode()) for lab in spec.labs)
        return settings, template, local_hub.config_hash(settings, template, labs_hash)

    def plan_hub(self, spec: HubSpec) -> HubPlan:
        _, _, config_hash = self._render(spec)
        running = local_hub.running_process(self.site)
        action, reason = plan_hub(config_hash, running.config_hash if running else None, running is not None)
        return HubPlan(action=action, config_hash=config_hash, url=self.site.hub_url, reason=reason)

    def apply_hub(self, spec: HubSpec, plan: HubPlan) -> HubDeployment:
        paths = self.site.paths
        # The runtime is made (or taken, when all in it is olab's) and marked before anything goes in.
        host.claim_runtime(self.site)
        SecretStore(paths.secrets).load_or_create()
        for lab in spec.labs:
            stage_lab(lab, paths.labs)
        stage_index(spec.labs, paths.labs)
        if spec.image.is_oci:
            engine = engine_for(spec.image.builder, paths.containers, insecure_registries(self.site))
            engine.ensure_local(spec.image.pinned, self.image_registry(prepare=False).login)
            engine.ensure_api_socket()
            # The bridge's interface must exist before the hub binds its gateway address.
            engine.ensure_bridge(local_hub.BRIDGE_NETWORK, spec.image.pinned)
        settings, template, config_hash = self._render(spec)
        if config_hash != plan.config_hash:
            raise RuntimeError("the hub's configuration changed between its plan and its apply; run deploy again")
        return local_hub.apply_hub(self.site, spec, plan, settings, template)

    def hub_state(self) -> HubState:
        running = local_hub.running_process(self.site)
        recorded = load_state(self.site).hub
        url = self.site.hub_url
        return HubState(
            running=running is not None,
            url=url,
            version=hub_version(url) if running else None,
            image=recorded.image if recorded else None,
            config_hash=running.config_hash if running else None,
            detail=f"pid {running.pid}" if running else "no hub process",
        )

    def hub_access(self) -> HubAccess:
        secrets = SecretStore(self.site.paths.secrets).load()
        return HubAccess(url=self.site.hub_url, token=secrets.api_token)

    def spawn_report(self, user: str) -> list[str]:
        log = local_hub.hub_log(self.site)
        if not log.exists():
            return []
        lines = [line for line in log.read_text(errors="replace").splitlines() if user in line]
        return [mask(line) for line in lines[-10:]]

    def stop_hub(self) -> bool:
        stopped = local_hub.stop_hub(self.site) is not None
        recorded = load_state(self.site).hub
        if recorded is not None and recorded.image is not None and recorded.image.is_oci:
            settings = local_hub.written_settings(self.site)
            if settings and settings.get("spawner") == "docker":
                left = self._engine(recorded.image).remove_leftovers(settings["container_prefix"], self.site.name)
                if left:
                    task_logger().warning("removed what a hub stopped outright left behind: %s", ", ".join(left))
        return stopped

    # User data: homes and the hub's state in the runtime folder, restore points in the backup folder.
    def data_facts(self) -> DataFacts:
        return host.runtime_facts(self.site)

    def check_backup_room(self, needed_bytes: int) -> None:
        # Before anything is stopped: backups apart from the runtime, the runtime olab's own,
        # the key to seal with at hand, room for the point.
        host.check_backup_location(self.site)
        host.check_runtime_mark(self.site, self.site.paths.runtime)
        key, created = sealing.ensure_site_key(self.site)
        if created:
            task_logger().warning(
                "created this site's restore key at %s (key id %s): copy it off this machine now (cat it into the "
                "course's password manager); without it no restore point of %s can be restored",
                key.path, key.key_id, self.site.name,
            )
        backup.check_writable(self.site.paths.backups, needed_bytes)

    def _key(self, point_id: str) -> sealing.RestoreKey:
        try:
            return sealing.site_key(self.site)
        except sealing.KeyMissing as exc:
            raise sealing.KeyMissing(f"restore point {point_id} cannot be checked: {exc}") from None

    def save_user_data(self, point_id: str, users: list[str]) -> RestorePointSummary:
        state = load_state(self.site)
        # The image the hub last ran; else the last one built.
        image = state.hub.image if state.hub else state.image
        manifest = backup.write_restore_point(
            self._key(point_id), self.site.paths.runtime, self.site.paths.backups / point_id, users,
            image, state.hub.config_hash if state.hub else None,
        )
        self._manifests[point_id] = manifest
        return RestorePointSummary(
            id=point_id, users=[u.name for u in manifest.users], files=manifest.total_files,
            bytes=manifest.total_bytes, image=image,
        )

    def _manifest(self, point_id: str) -> Manifest:
        return self._manifests.get(point_id) or backup.read_manifest(self.site.paths.backups / point_id, self._key(point_id))

    def verify_user_data(self, point_id: str) -> None:
        backup.verify_restore_point(self.site.paths.backups / point_id, self._manifest(point_id), self._key(point_id))

    def plan_release(self, point_id: str) -> InfraPlan | None:
        """None: the runtime folder is deleted only after its restore point is verified."""
        return None

    def release_runtime(self) -> None:
        host.delete_runtime(self.site)

    def restore_points(self) -> list[RestorePoint]:
        return backup.list_restore_points(self.site.paths.backups)

    def prune_restore_points(self, protect: set[str]) -> list[str]:
        return backup.prune(self.site.paths.backups, self.site.config.backups.keep, protect)

    def bring_back_user_data(self, point_id: str) -> list[UserRestore]:
        return backup.unpack_and_verify(self.site.paths.backups / point_id, host.staging_dir(self.site), self._key(point_id))

    def swap_in_restored(self) -> None:
        host.swap_in(self.site)

    def restore_point_image(self, point_id: str) -> ImageRef | None:
        manifest = self._manifest(point_id)
        return ImageRef.model_validate(manifest.image_ref) if manifest.image_ref else None

    def read_mark(self) -> TeardownMark | None:
        return read_mark(self.site)

    def write_mark(self, phase: str, point_id: str) -> None:
        write_mark(self.site, phase, point_id)

    def clear_mark(self) -> None:
        clear_mark(self.site)

    def shutdown_savings(self) -> list[str]:
        return []  # this machine is not billed by the hour
