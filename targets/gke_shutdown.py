"""The gke target's weekend shutdown, in the mode each site chooses (``gke.shutdown.mode``).

scale-to-zero (default): user servers stopped through the hub, both pools set to 0 nodes;
cluster and disks stay, and the restore point (in the state bucket, beside the terraform
state) records every claim and the disk under it, to be found bound to the same disk on
Monday.

destroy: user servers stopped; a snapshot of every claim's disk (users' and the hub's), all
at once, each waited on until READY; the manifest (claim -> volume -> disk -> snapshot, zone,
size, storage class, labels, image digest, release hash) in the state bucket before anything
is deleted; then terraform removes the cluster and its pools (``cluster = false``: the
registry and the hub's address stay), after an approval unless the site gives it in advance,
and the disks are deleted, each only with a READY snapshot of that very disk. Restore: the
cluster provisioned again while the disks are made from the snapshots (independent: in
parallel), then each claim bound again, by the same name, to a volume on its restored disk
(``Retain``), and the hub deployed with the same image digest.

A mixin of :class:`targets.gke.GkePlatform`, which gives it the site, its terraform, its
kubeconfig, Helm's release facts and provisioning.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from core.config import GkeSettings, Site
from core.faults import checkpoint
from core.logs import task_logger
from core.models import DataFacts, HubState, ImageRef, InfraPlan, PlannedStep, RestorePointSummary, UserRestore
from core.planning import Refused, by_zone, claims_to_restore, disks_to_snapshot, hours_off, shutdown_savings
from core.restore_points import RestorePoint, TeardownMark, plan_prune
from core.threads import parallel
from core.state import load_state, update_state
from tasks.gcs import RestorePointStore, storage_client

APPROVE_SETTING = "gke.shutdown.approve_destroy"


def _gib(size: str) -> int:
    """Bytes of a Kubernetes quantity such as 10Gi (0 when there is none)."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", size or "")
    if not match:
        return 0
    return int(match.group(1)) * {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}[match.group(2)]


class GkeShutdown:
    site: Site
    gke: GkeSettings
    _points: RestorePointStore | None
    _destroy_plan = None  # tasks.terraform.PlanSummary of cluster = false, once planned
    _mark: TeardownMark | None = None
    _mark_known = False  # read_mark's memo (see there)

    # ---- where restore points live, what the cluster holds --------------------------------

    def _store(self) -> RestorePointStore:
        if self._points is None:
            from targets.gke import backend_settings

            prefix = backend_settings(self.site)["prefix"]
            self._points = RestorePointStore(storage_client(self.gke.apis, self.gke.project), self.gke.terraform_state_bucket, prefix)
        return self._points

    @property
    def _destroy(self) -> bool:
        return self.gke.shutdown.mode == "destroy"

    def _cluster_gone(self) -> bool:
        """The site is torn down in destroy mode: no cluster to ask anything."""
        mark = self.read_mark()
        return mark is not None and mark.phase in ("torn-down", "restoring") and self._destroy

    def _clusters(self):
        from tasks.gke import cluster_manager

        return cluster_manager(self.gke.apis)

    def _compute(self):
        from tasks.compute import compute_clients

        return compute_clients(self.gke.apis)

    def _pool_names(self) -> dict[str, str]:
        infra = load_state(self.site).infra
        return {"core": infra.get("core_pool", "core"), "user": infra.get("user_pool", "user")}

    def _resize(self, pool: str, nodes: int) -> None:
        from tasks.gke import set_pool_size

        name = self._pool_names()[pool]
        task_logger().info("pool %s of cluster %s: %d nodes", name, self.gke.cluster_name, nodes)
        set_pool_size(self._clusters(), self.gke.project, self.gke.location, self.gke.cluster_name, name, nodes,
                      timeout=float(self.gke.cluster_ready_timeout_seconds), poll=float(self.gke.poll_seconds))

    def _claims(self):
        from tasks.kubernetes import api_from_kubeconfig, user_claims

        with api_from_kubeconfig(self._kubeconfig()) as api:
            return user_claims(api, self.gke.namespace)

    def _snapshot_labels(self, point_id: str) -> dict[str, str]:
        from tasks.compute import label_value

        return {"olab-site": label_value(self.site.name), "olab-restore-point": label_value(point_id)}

    # ---- teardown --------------------------------------------------------------------------

    def stop_hub(self) -> bool:
        """Every user server stopped through the hub; no pool is touched.

        The core pool (hub, proxy) goes away in release_runtime, once a restore point is
        COMPLETE and the mark says so: scaled down here, before the restore point, a teardown
        killed after this step would leave a site no run could finish (its hub unreachable, yet
        its release deployed: the rerun's teardown must stop user servers through that hub, and
        restore finds no mark, so it only redeploys, which does not size the pools)."""
        from tasks.hub_api import hub_version, stop_user_servers

        running = hub_version(self.gke.url) is not None
        if running:
            stop_user_servers(self.hub_access(), float(self.site.config.hub.start_timeout_seconds))
        return running

    def data_facts(self) -> DataFacts:
        mark = self.read_mark()
        if mark is not None and mark.phase == "torn-down":
            return DataFacts(exists=False, where=f"cluster {self.gke.cluster_name}")
        if mark is not None and mark.phase == "restoring" and self._destroy:
            return DataFacts(exists=False, where=f"cluster {self.gke.cluster_name} (its restore from {mark.restore_point} "
                                                 "is unfinished: run restore)")
        every = self._claims()
        claims = [c for c in every if c.kind == "user"]
        return DataFacts(
            # A hub deployed, or claims holding data (a restore killed after it cleared its mark
            # and before deploy-hub: the claims are back, the release is not yet).
            exists=bool(every) or self._release_facts().deployed_revision is not None,
            users=sorted(c.username or c.claim for c in claims), files=len(claims),
            bytes=sum(_gib(c.size) for c in claims), where=f"cluster {self.gke.cluster_name}",
            kept_at=f"gs://{self.gke.terraform_state_bucket}/{self._store().prefix}/restore-points"
                    + (" (and a snapshot of each disk)" if self._destroy else ""),
            release=(f"cluster {self.gke.cluster_name} and its pools (terraform), then the {len(every)} disks, each after its "
                     "snapshot is READY" if self._destroy else f"the nodes of cluster {self.gke.cluster_name}: both pools to 0"),
        )

    def check_backup_room(self, needed_bytes: int) -> None:
        self._store().check()

    def save_user_data(self, point_id: str, users: list[str]) -> RestorePointSummary:
        """The restore point's manifest: every claim and its disk. In destroy mode the
        manifest is written first (a run killed while snapshotting leaves a point that
        retention removes, snapshots included), then every disk is snapshotted and the
        manifest written again with each claim's READY snapshot."""
        state = load_state(self.site)
        image = state.hub.image if state.hub else state.image
        claims = self._claims()
        dumped = [c.model_dump(mode="json") for c in claims]
        manifest = {
            "schema_version": 1, "id": point_id, "site": self.site.name, "mode": self.gke.shutdown.mode,
            "created": datetime.now(UTC).isoformat(), "cluster": self.gke.cluster_name, "location": self.gke.location,
            "project": self.gke.project, "namespace": self.gke.namespace,
            "pools": {pool: {"name": name, "nodes_after_restore": self._restore_size(pool)} for pool, name in self._pool_names().items()},
            "claims": dumped,
            "image_ref": image.model_dump(mode="json") if image else None,
            "release_hash": self._release_facts().deployed_hash,
        }
        if self._destroy:
            manifest["snapshots"] = self._snapshot(point_id, manifest)
        self._store().write_manifest(point_id, manifest)
        user_claims = [c for c in claims if c.kind == "user"]
        return RestorePointSummary(id=point_id, users=sorted(c.username or c.claim for c in user_claims), files=len(user_claims),
                                   bytes=sum(_gib(c.size) for c in user_claims), image=image)

    def _snapshot(self, point_id: str, manifest: dict) -> dict[str, dict]:
        from tasks.compute import snapshot_disks

        disks, skipped = disks_to_snapshot(manifest["claims"], self.gke.project)
        if skipped:
            task_logger().info("claims with no disk yet (never written to), nothing to keep: %s", ", ".join(skipped))
        self._store().write_manifest(point_id, {**manifest, "snapshots": {}})
        checkpoint("teardown", "manifest")
        claim_of = {(d.zone, d.disk): d.claim for d in disks}
        shutdown = self.gke.shutdown
        recorded: dict[str, dict] = {}
        with self._compute() as clients:
            def zone_step(zone: str, group: list):
                return lambda: snapshot_disks(
                    clients, self.gke.project, zone, [d.disk for d in group], point_id, self._snapshot_labels(point_id),
                    timeout=float(shutdown.snapshot_timeout_seconds), poll=float(self.gke.poll_seconds),
                )

            zones = by_zone(disks)
            for infos in parallel([zone_step(z, g) for z, g in zones.items()]):
                for info in infos:
                    recorded[claim_of[(info.zone, info.source_disk)]] = info.model_dump(mode="json")
        return recorded

    def _restore_size(self, pool: str) -> int:
        settings = self.gke.core_pool if pool == "core" else self.gke.user_pool
        return max(settings.min_nodes, 1) if pool == "core" else settings.min_nodes

    def verify_user_data(self, point_id: str) -> None:
        """Every claim of the cluster is in the manifest, and (destroy mode) every disk has
        its snapshot READY at Compute, of that very disk; then the point is COMPLETE."""
        from tasks.compute import list_snapshots

        manifest = self._store().read_manifest(point_id)
        named = {c["claim"] for c in manifest.get("claims", [])}
        missing = sorted({c.claim for c in self._claims()} - named)
        if missing:
            raise RuntimeError(f"restore point {point_id} does not name the claims {', '.join(missing)}")
        if manifest.get("mode") == "destroy":
            wanted = claims_to_restore(manifest)
            with self._compute() as clients:
                found = {s.name: s for s in list_snapshots(clients, self.gke.project, self._snapshot_labels(point_id))}
            problems = []
            for want in wanted:
                snap = found.get(want.snapshot)
                if snap is None or not snap.ready or (snap.zone, snap.source_disk) != (want.zone, want.disk):
                    problems.append(f"{want.claim}: snapshot {want.snapshot} " + (f"is {snap.status} of {snap.zone}/{snap.source_disk}" if snap else "is missing"))
            if problems:
                raise RuntimeError(f"restore point {point_id} is not kept whole at Compute: {'; '.join(problems)}")
        self._store().mark_complete(point_id)

    def plan_release(self, point_id: str) -> InfraPlan | None:
        """Destroy mode: terraform's plan without the cluster (its pools and cluster destroyed)
        and the disks to delete, each with its READY snapshot: what the approval is for."""
        if not self._destroy:
            return None
        tf = self.terraform()
        tf.init()
        self._destroy_plan = tf.plan(variables={"cluster": False})
        manifest = self._store().read_manifest(point_id)
        wanted = claims_to_restore(manifest)
        from targets.gke import infra_plan

        plan = infra_plan(self._destroy_plan)
        steps = plan.steps + [
            PlannedStep(verb="delete", subject=f"disk {w.zone}/{w.disk}", detail=f"claim {w.claim}, snapshot {w.snapshot} READY")
            for w in wanted
        ]
        summary = f"{plan.summary}; delete {len(wanted)} disk(s), each kept in a READY snapshot of restore point {point_id}"
        return InfraPlan(
            target="gke", summary=summary, steps=steps, changes=True, destructive=True,
            approved_by=APPROVE_SETTING if self.gke.shutdown.approve_destroy else None,
        )

    def release_runtime(self) -> None:
        """scale-to-zero: both pools to 0 nodes. destroy: the planned terraform change (no
        cluster, no pools), then every disk of the restore point the mark names, each only
        with its READY snapshot (tasks.compute.delete_disks checks them all first)."""
        if not self._destroy:
            self._resize("user", 0)
            self._resize("core", 0)
            return
        from tasks.compute import delete_disks

        if self._destroy_plan is None:
            raise RuntimeError("release_runtime in destroy mode needs the plan that was approved (plan_release)")
        mark = self.read_mark()
        if mark is None:
            raise RuntimeError("release_runtime in destroy mode needs the teardown's mark (its restore point)")
        if self._destroy_plan.has_changes:
            task_logger().info("terraform: %s", self._destroy_plan.describe())
            self.terraform().apply(self._destroy_plan)
        checkpoint("teardown", "cluster-destroyed")
        wanted = claims_to_restore(self._store().read_manifest(mark.restore_point))
        with self._compute() as clients:
            for zone, group in by_zone(wanted).items():
                delete_disks(clients, self.gke.project, zone, [w.disk for w in group],
                             require_snapshots={w.disk: w.snapshot for w in group},
                             timeout=float(self.gke.cluster_ready_timeout_seconds), poll=float(self.gke.poll_seconds))

    def restore_points(self) -> list[RestorePoint]:
        return self._store().points()

    def prune_restore_points(self, protect: set[str]) -> list[str]:
        """Retention: a removed point's snapshots go with it (only olab's own, by label)."""
        from tasks.compute import delete_snapshots, list_snapshots

        doomed = plan_prune(self.restore_points(), self.site.config.backups.keep, protect)
        for point in doomed:
            if self._destroy or self._point_mode(point.id) == "destroy":
                with self._compute() as clients:
                    names = [s.name for s in list_snapshots(clients, self.gke.project, self._snapshot_labels(point.id))]
                    delete_snapshots(clients, self.gke.project, names, require_labels={"olab-site": self._snapshot_labels(point.id)["olab-site"]},
                                     timeout=float(self.gke.cluster_ready_timeout_seconds), poll=float(self.gke.poll_seconds))
            self._store().delete_point(point.id)
        return [p.id for p in doomed]

    def _point_mode(self, point_id: str) -> str | None:
        try:
            return self._store().read_manifest(point_id).get("mode")
        except Exception:  # an unfinished point may have no manifest
            return None

    # ---- restore ---------------------------------------------------------------------------

    def bring_back_user_data(self, point_id: str) -> list[UserRestore]:
        """Every claim bound to the disk the restore point names: after scale-to-zero the
        pools are sized again and the claims checked; after destroy the cluster is made again
        while the disks are made from their snapshots, then the claims are bound to them."""
        from tasks.gke import wait_until_ready

        manifest = self._store().read_manifest(point_id)
        if manifest.get("mode") == "destroy":
            wanted = claims_to_restore(manifest)
            parallel([self._provision_again, lambda: self._disks_from_snapshots(manifest, wanted)])
            self._bind_claims(manifest, wanted)
        else:
            for pool in ("core", "user"):
                self._resize(pool, int(manifest["pools"][pool]["nodes_after_restore"]))
            wait_until_ready(self._clusters(), self.gke.project, self.gke.location, self.gke.cluster_name,
                             [p["name"] for p in manifest["pools"].values()],
                             timeout=float(self.gke.cluster_ready_timeout_seconds), poll=float(self.gke.poll_seconds))
        now = {c.claim: c for c in self._claims()}
        restored = []
        for kept in manifest["claims"]:
            if kept.get("disk") is None and manifest.get("mode") == "destroy":
                continue  # a claim that never had a disk: nothing was kept, nothing to bind
            current = now.get(kept["claim"])
            if current is None or current.phase != "Bound" or (current.disk and current.disk.model_dump(mode="json")) != kept.get("disk"):
                raise RuntimeError(f"claim {kept['claim']} is not bound to the disk restore point {point_id} names")
            if kept["kind"] == "user":
                restored.append(UserRestore(user=kept.get("username") or kept["claim"], files=1, bytes=_gib(kept.get("size", "")), verified=True))
        if image := manifest.get("image_ref"):
            # The site's image is the restore point's again, as a local restore brings back the
            # site state it kept. A restore killed after it cleared its mark, run again, finds the
            # site up and only makes sure the hub is deployed: with this image, the one the
            # killed run deployed (without it, a hub deployed with an image given by hand has none
            # recorded: "no image built yet", and the rerun never succeeds).
            update_state(self.site, image=ImageRef.model_validate(image))
        return restored

    def _provision_again(self) -> None:
        """provision-cluster's plan and apply, refused when it would destroy or replace
        anything (that is provision-cluster's to do, with its approval)."""
        plan = self.plan_provision()
        if plan.destructive:
            raise Refused(f"site {self.site.name}: bringing the cluster back would also {plan.summary}; run provision-cluster and approve it first")
        report = self.provision(plan)
        failed = [f"{c.name}: {c.detail}" for c in report.checks if not c.ok]
        if failed:
            raise RuntimeError(f"the cluster came back unready: {'; '.join(failed)}")
        checkpoint("restore", "provision")

    def _disks_from_snapshots(self, manifest: dict, wanted: list) -> None:
        from tasks.compute import RestoreDisk, disks_from_snapshots

        labels = {"olab-site": self._snapshot_labels(manifest["id"])["olab-site"]}
        with self._compute() as clients:
            for zone, group in by_zone(wanted).items():
                disks_from_snapshots(clients, self.gke.project, zone, [RestoreDisk(w.disk, w.snapshot, labels) for w in group],
                                     timeout=float(self.gke.shutdown.snapshot_timeout_seconds), poll=float(self.gke.poll_seconds))
        checkpoint("restore", "disks")

    def _bind_claims(self, manifest: dict, wanted: list) -> None:
        from core.hub_values import HUB_RELEASE
        from tasks.kubernetes import GceDisk, RestoredClaim, api_from_kubeconfig, bind_restored_claims, ensure_namespace

        claims = [
            RestoredClaim(
                claim=w.claim["claim"], namespace=w.claim["namespace"] or self.gke.namespace,
                volume=w.claim.get("volume") or f"olab-{w.claim['claim']}",
                disk=GceDisk.model_validate(w.claim["disk"]), size=w.claim.get("size") or "10Gi",
                storage_class=w.claim.get("storage_class"), access_modes=w.claim.get("access_modes") or ["ReadWriteOnce"],
                labels=w.claim.get("labels") or {}, username=w.claim.get("username"),
                helm_release=HUB_RELEASE if w.claim["kind"] == "hub" else None,
            )
            for w in wanted
        ]
        with api_from_kubeconfig(self._kubeconfig()) as api:
            for namespace in sorted({c.namespace for c in claims}):
                ensure_namespace(api, namespace)
            bind_restored_claims(api, claims)

    def swap_in_restored(self) -> None:
        """Nothing to swap: the claims are bound where they were (or again, to the restored disks)."""

    def restore_point_image(self, point_id: str) -> ImageRef | None:
        image = self._store().read_manifest(point_id).get("image_ref")
        return ImageRef.model_validate(image) if image else None

    def read_mark(self) -> TeardownMark | None:
        """The bucket's teardown mark, read once until this platform writes or clears it: a
        flow asks for it at each step (hub state, data facts, the decision) and every ask was
        a request to Cloud Storage. Sound because a platform lives for one flow run, which
        holds the site's lock: nothing else writes the mark meanwhile."""
        if not self._mark_known:
            self._mark, self._mark_known = self._store().read_mark(), True
        return self._mark

    def write_mark(self, phase: str, point_id: str) -> None:
        self._mark_known = False
        self._store().write_mark(phase, point_id)

    def clear_mark(self) -> None:
        self._mark_known = False
        self._store().clear_mark()

    def shutdown_savings(self) -> list[str]:
        """The cost artifact's lines: node-hours (and in destroy mode cluster-hours) the schedule saves."""
        schedules = self.site.config.schedules
        hours = hours_off(schedules.teardown, schedules.restore, schedules.timezone)
        pools = {
            "core": (self.gke.core_pool.machine_type, max(self.gke.core_pool.min_nodes, 1)),
            "user": (self.gke.user_pool.machine_type, self.gke.user_pool.max_nodes),
        }
        saved = shutdown_savings(pools, hours, self.gke.shutdown.mode, self.gke.prices)
        return [f"{saved.hours:.0f} hours off a week ({schedules.teardown} to {schedules.restore}, {schedules.timezone})",
                *saved.lines, f"saved per weekend: up to {saved.amount:.2f} {saved.currency} (user pool at its maximum)"]

    def cluster_gone_state(self) -> HubState:
        return HubState(running=False, url=self.gke.url, detail=f"cluster {self.gke.cluster_name} destroyed by the weekend shutdown")
