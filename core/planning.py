"""What to change: pure functions over plain data, tested without any server."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from core.config import Site
from core.files import content_hash, sha256_bytes
from core.models import (
    DataFacts,
    HubAction,
    HubSpec,
    HubState,
    ImageRef,
    LabResult,
    LabSource,
    PlannedStep,
    ResourceLimits,
)
from core.restore_points import RestorePoint, TeardownMark, choose_restore_point

LOCK_HEADER = re.compile(r"^# olab-input-sha256: ([0-9a-f]{64})\s*$", re.MULTILINE)
REQUIREMENTS_IN = "requirements.in"
REQUIREMENTS_LOCK = "requirements.lock"


class StaleLock(ValueError):
    """The lock file no longer matches the requirements it was made from."""


def check_lock(requirements_in: bytes, lock_text: str, lock_path: Path) -> None:
    found = LOCK_HEADER.search(lock_text)
    if not found:
        raise StaleLock(f"{lock_path}: no '# olab-input-sha256:' header; regenerate it with `olab lock`")
    if found.group(1) != sha256_bytes(requirements_in):
        raise StaleLock(
            f"{lock_path} was made from another {REQUIREMENTS_IN}; regenerate it with `olab lock`"
        )


def lock_header(requirements_in: bytes) -> str:
    return f"# olab-input-sha256: {sha256_bytes(requirements_in)}\n"


def image_tag(context_files: dict[str, bytes], python_version: str, builder: str) -> str:
    """The content hash of everything that goes into a user environment."""
    pieces = dict(context_files)
    pieces["\0python"] = python_version.encode()
    pieces["\0builder"] = builder.encode()
    return content_hash(pieces.items())


@dataclass(frozen=True)
class BuildPlan:
    tag: str
    build: bool
    reason: str


def plan_build(tag: str, existing: ImageRef | None) -> BuildPlan:
    """``tag`` is the full content hash; an image is pinned by it as its digest."""
    if existing is not None and existing.digest == f"sha256:{tag}":
        return BuildPlan(tag, False, f"environment {tag[:12]} is already built")
    return BuildPlan(tag, True, f"no complete environment for inputs {tag[:12]}")


def lab_cache_key(image: ImageRef, lab: LabSource, cell_timeout: int) -> str:
    return sha256_bytes(f"{image.digest}\0{lab.content_hash}\0{cell_timeout}".encode())


@dataclass(frozen=True)
class LabPlan:
    to_run: list[LabSource]
    reused: list[LabResult]


def plan_labs(labs: list[LabSource], cached: dict[str, LabResult]) -> LabPlan:
    """Labs whose (environment, content) pair already passed are not rerun."""
    to_run, reused = [], []
    for lab in labs:
        hit = cached.get(lab.name)
        if hit is not None and hit.passed:
            reused.append(hit.model_copy(update={"cached": True}))
        else:
            to_run.append(lab)
    return LabPlan(to_run, reused)


def hub_spec(site: Site, image: ImageRef, labs: list[LabSource]) -> HubSpec:
    """The hub a site asks for, on ``image``, serving ``labs``: what every target renders."""
    hub = site.config.hub
    return HubSpec(
        image=image,
        authenticator=hub.authenticator,
        admins=sorted(hub.admins),
        default_url=hub.default_url,
        start_timeout_seconds=hub.start_timeout_seconds,
        limits=ResourceLimits(memory=hub.memory_limit, cpu=hub.cpu_limit),
        cull_idle_seconds=hub.cull_idle_seconds,
        labs=labs,
    )


def plan_hub(config_hash: str, running_hash: str | None, running: bool) -> tuple[HubAction, str]:
    """Start a hub that is not running; restart one whose config changed. (action, reason)"""
    if not running:
        return "start", "no hub is running"
    if running_hash != config_hash:
        return "restart", f"its configuration changed ({(running_hash or 'unknown')[:12]} -> {config_hash[:12]})"
    return "unchanged", f"it already runs configuration {config_hash[:12]}"


class Refused(RuntimeError):
    """A lifecycle flow that must not run in the site's present state; the message says why."""


@dataclass(frozen=True)
class TeardownDecision:
    kind: Literal["finish", "fresh"]
    restore_point: str | None = None
    already_torn_down: bool = False


def plan_teardown(site: str, mark: TeardownMark | None, data: DataFacts) -> TeardownDecision:
    """Finish a teardown that already kept a verified restore point; else start a fresh one,
    which needs something to tear down."""
    if mark is not None and mark.phase in ("deleting", "torn-down"):
        return TeardownDecision("finish", mark.restore_point, already_torn_down=mark.phase == "torn-down")
    if not data.exists:
        raise Refused(f"site {site} has no runtime at {data.where}: nothing to tear down")
    return TeardownDecision("fresh")


def teardown_steps(
    decision: TeardownDecision, data: DataFacts, hub: HubState, running_servers: list[str], backups: str, keep: int
) -> list[PlannedStep]:
    """What a teardown would do, for its dry run."""
    backups = data.kept_at or backups
    if decision.kind == "finish":
        if decision.already_torn_down:
            return [PlannedStep(verb="leave", subject="the site", detail=f"already torn down; restore point {decision.restore_point}")]
        return [PlannedStep(verb="finish", subject=f"deleting {data.where}", detail=f"restore point {decision.restore_point} is complete")]
    steps = [PlannedStep(verb="check", subject=f"room at {backups}", detail=f"{data.bytes} bytes to keep")]
    if hub.running:
        steps.append(PlannedStep(verb="stop", subject="user servers", detail=", ".join(running_servers) or "none are running"))
        steps.append(PlannedStep(verb="stop", subject=f"the hub at {hub.url}", detail=hub.detail))
    else:
        steps.append(PlannedStep(verb="leave", subject="the hub", detail="not running"))
    steps.append(
        PlannedStep(
            verb="archive", subject=f"{len(data.users)} users and the hub's state",
            detail=f"{data.files} files, {data.bytes} bytes, into a new restore point in {backups}",
        )
    )
    steps.append(PlannedStep(verb="delete", subject=data.release or data.where, detail="after the restore point is verified"))
    steps.append(PlannedStep(verb="prune", subject="restore points", detail=f"keeping the newest {keep} complete ones"))
    return steps


@dataclass(frozen=True)
class RestoreDecision:
    kind: Literal["ensure-deployed", "restore"]
    point: RestorePoint | None = None
    finish_deletion: bool = False


def plan_restore(
    site: str, mark: TeardownMark | None, runtime_exists: bool, points: list[RestorePoint], wanted: str | None
) -> RestoreDecision:
    """Restore a torn-down site from a complete point; on a live site only make sure its hub runs."""
    if mark is None:
        if wanted:
            raise Refused(f"site {site} is not torn down; restoring {wanted} over a live site is refused")
        if not runtime_exists:
            raise Refused(f"site {site} is not torn down and has no runtime: nothing to restore")
        return RestoreDecision("ensure-deployed")
    try:
        chosen = choose_restore_point(points, wanted)
    except ValueError as exc:
        raise Refused(f"site {site}: {exc}") from None
    return RestoreDecision("restore", chosen, finish_deletion=mark.phase == "deleting")


def restore_steps(decision: RestoreDecision, where: str) -> list[PlannedStep]:
    if decision.kind == "ensure-deployed":
        return [PlannedStep(verb="leave", subject="the data", detail="the site is not torn down"),
                PlannedStep(verb="start", subject="the hub, if it is not running", detail="as deploy-hub would")]
    assert decision.point is not None
    steps = []
    if decision.finish_deletion:
        steps.append(PlannedStep(verb="finish", subject=f"deleting {where}", detail="the teardown did not finish it"))
    steps += [
        PlannedStep(verb="restore", subject=decision.point.id, detail="unpack beside the runtime, verify every file"),
        PlannedStep(verb="start", subject="the hub", detail="on the image the restore point names"),
    ]
    return steps


def release_hash(chart: str, chart_version: str, values_layers: list[dict], secret_digest: str, image_digest: str) -> str:
    """What a helm release is made of: the chart and its version, the values olab gives it
    (secrets by their digest only), the image digest. Equal hashes: nothing to upgrade."""
    return content_hash(
        [
            ("chart", f"{chart}@{chart_version}".encode()),
            ("values", json.dumps(values_layers, sort_keys=True, default=str).encode()),
            ("secrets", secret_digest.encode()),
            ("image", image_digest.encode()),
        ]
    )


@dataclass(frozen=True)
class ReleaseFacts:
    """A helm release as the cluster holds it (plain data from its release secrets)."""

    deployed_revision: int | None = None
    deployed_hash: str | None = None
    stuck_revision: int | None = None
    stuck_status: str | None = None


def plan_release(release_hash_now: str, facts: ReleaseFacts) -> tuple[HubAction, str]:
    """Install a release that is not there, upgrade one that differs or is stuck, else leave it."""
    if facts.stuck_revision is not None:
        return (
            "restart" if facts.deployed_revision else "start",
            f"revision {facts.stuck_revision} is stuck in {facts.stuck_status}: "
            + (f"roll back to revision {facts.deployed_revision}, then upgrade" if facts.deployed_revision else "remove it, then install"),
        )
    if facts.deployed_revision is None:
        return "start", "no deployed release: install it"
    if facts.deployed_hash != release_hash_now:
        return "restart", f"revision {facts.deployed_revision} differs ({(facts.deployed_hash or 'no hash')[:12]} -> {release_hash_now[:12]}): upgrade"
    return "unchanged", f"revision {facts.deployed_revision} already is {release_hash_now[:12]}: nothing to do"


def hours_off(teardown_cron: str, restore_cron: str, timezone: str, *, after: datetime | None = None) -> float:
    """Hours between a scheduled teardown and the restore that follows it (pure; the cron
    iterator Prefect's scheduler uses, its vendored croniter, as the site file's validation
    does: a cron the site file accepts is one this reads the same way)."""
    from zoneinfo import ZoneInfo

    from prefect._vendor.croniter import croniter

    start = (after or datetime(2026, 1, 5, tzinfo=UTC)).astimezone(ZoneInfo(timezone))
    down = croniter(teardown_cron, start).get_next(datetime)
    up = croniter(restore_cron, down).get_next(datetime)
    return (up - down).total_seconds() / 3600


@dataclass(frozen=True)
class Savings:
    hours: float
    node_hours: float
    cluster_hours: float
    amount: float
    currency: str
    lines: list[str]


def shutdown_savings(pools: dict[str, tuple[str, int]], hours: float, mode: str, prices) -> Savings:
    """What a weekend shutdown saves: every node of every pool for ``hours``, and the
    cluster fee too when the cluster is destroyed (pure; prices from the site file)."""
    lines, amount, node_hours = [], 0.0, 0.0
    for pool, (machine, nodes) in sorted(pools.items()):
        price = prices.node_hour.get(machine)
        saved = nodes * hours
        node_hours += saved
        cost = saved * price if price is not None else 0.0
        amount += cost
        lines.append(f"pool {pool}: {nodes} x {machine} for {hours:.0f} h = {saved:.0f} node-hours"
                     + (f" = {cost:.2f} {prices.currency}" if price is not None else " (no price for it in gke.prices.node_hour)"))
    cluster_hours = hours if mode == "destroy" else 0.0
    if cluster_hours:
        amount += cluster_hours * prices.cluster_hour
        lines.append(f"cluster fee: {cluster_hours:.0f} h = {cluster_hours * prices.cluster_hour:.2f} {prices.currency}")
    else:
        lines.append("cluster fee: still paid (scale-to-zero keeps the cluster)")
    return Savings(hours, node_hours, cluster_hours, round(amount, 2), prices.currency, lines)


# ---- the gke weekend shutdown's destroy mode: which disks to snapshot, what to bring back ----


@dataclass(frozen=True)
class DiskOfClaim:
    """One claim's disk, as a restore point records it (plain data)."""

    claim: str
    zone: str
    disk: str


def disks_to_snapshot(claims: list[dict], project: str) -> tuple[list[DiskOfClaim], list[str]]:
    """(the disks under the claims, the claims skipped because they hold no disk yet: a
    claim still Pending has never been written to). ``claims``: tasks.kubernetes
    ClaimBinding dumps. Refused, naming them all, for what a snapshot cannot keep here: a
    regional disk, a disk of another project, a bound claim whose volume is no GCE disk."""
    found, skipped, problems = [], [], []
    for c in claims:
        disk = c.get("disk")
        if disk is None:
            if c.get("phase") == "Bound" or c.get("volume"):
                problems.append(f"claim {c['claim']} is bound to volume {c.get('volume')}, which is no GCE persistent disk")
            else:
                skipped.append(c["claim"])
            continue
        if disk.get("regional"):
            problems.append(f"claim {c['claim']}: disk {disk['name']} is regional (only zonal disks are snapshotted)")
        elif disk.get("project") not in (None, project):
            problems.append(f"claim {c['claim']}: disk {disk['name']} is in project {disk['project']}, not {project}")
        elif not disk.get("location"):
            problems.append(f"claim {c['claim']}: the zone of disk {disk['name']} is unknown")
        else:
            found.append(DiskOfClaim(claim=c["claim"], zone=disk["location"], disk=disk["name"]))
    if problems:
        raise Refused("the weekend shutdown in destroy mode cannot keep: " + "; ".join(problems))
    return found, skipped


def by_zone(disks: list[DiskOfClaim]) -> dict[str, list[DiskOfClaim]]:
    zones: dict[str, list[DiskOfClaim]] = {}
    for d in disks:
        zones.setdefault(d.zone, []).append(d)
    return zones


@dataclass(frozen=True)
class ClaimToRestore:
    """A claim of a destroy-mode restore point: its record, and the snapshot its disk is made from."""

    claim: dict
    zone: str
    disk: str
    snapshot: str


def claims_to_restore(manifest: dict) -> list[ClaimToRestore]:
    """What a destroy-mode restore point brings back: every claim that had a disk, with the
    READY snapshot the manifest records for it. A claim with a disk and no READY snapshot
    recorded means the manifest is not one a teardown completed: refused, naming them."""
    snapshots = manifest.get("snapshots") or {}
    wanted, missing = [], []
    for c in manifest.get("claims", []):
        if c.get("disk") is None:
            continue
        snap = snapshots.get(c["claim"]) or {}
        if snap.get("status") != "READY" or snap.get("source_disk") != c["disk"]["name"]:
            missing.append(c["claim"])
            continue
        wanted.append(ClaimToRestore(claim=c, zone=c["disk"]["location"], disk=c["disk"]["name"], snapshot=snap["name"]))
    if missing:
        raise Refused(f"restore point {manifest.get('id')}: no READY snapshot recorded for {', '.join(missing)}")
    return wanted
