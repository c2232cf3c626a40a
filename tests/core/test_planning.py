"""Pure planning: what to build, which labs to run, what to do with the hub."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.models import DataFacts, HubState, ImageRef, LabResult, LabSource
from core.planning import (
    Refused,
    StaleLock,
    check_lock,
    image_tag,
    lab_cache_key,
    lock_header,
    plan_build,
    plan_hub,
    plan_labs,
    plan_restore,
    plan_teardown,
    restore_steps,
    teardown_steps,
)
from core.restore_points import RestorePoint, TeardownMark

IMAGE = ImageRef(name="u", tag="a" * 16, digest="sha256:" + "a" * 64, location="/envs/u")


def test_image_tag_depends_on_every_input():
    base = {"requirements.in": b"numpy\n", "requirements.lock": b"numpy==2\n"}
    tag = image_tag(base, "3.11.7", "venv")
    assert tag == image_tag(dict(reversed(base.items())), "3.11.7", "venv")
    assert tag != image_tag({**base, "requirements.lock": b"numpy==3\n"}, "3.11.7", "venv")
    assert tag != image_tag({**base, "extra.txt": b""}, "3.11.7", "venv")
    assert tag != image_tag(base, "3.12.0", "venv")
    assert tag != image_tag(base, "3.11.7", "buildah")


def test_plan_build_reuses_only_the_same_tag():
    assert plan_build("a" * 64, None).build
    assert not plan_build("a" * 64, IMAGE).build
    assert plan_build("b" * 64, IMAGE).build


def test_lock_check():
    source = b"numpy\n"
    check_lock(source, lock_header(source) + "numpy==2\n", Path("x.lock"))
    with pytest.raises(StaleLock, match="made from another requirements.in"):
        check_lock(b"scipy\n", lock_header(source) + "numpy==2\n", Path("x.lock"))
    with pytest.raises(StaleLock, match="no '# olab-input-sha256:' header"):
        check_lock(source, "numpy==2\n", Path("x.lock"))


def test_plan_labs_reruns_failures_and_unknown_labs():
    labs = [LabSource(name=n, path=Path(f"{n}.md"), content_hash=n * 8) for n in ("a", "b", "c")]
    cached = {
        "a": LabResult(lab="a", status="passed", seconds=1.0),
        "b": LabResult(lab="b", status="failed", seconds=1.0, error="x"),
    }
    plan = plan_labs(labs, cached)
    assert [lab.name for lab in plan.to_run] == ["b", "c"]
    assert [r.lab for r in plan.reused] == ["a"] and plan.reused[0].cached


def test_lab_cache_key_changes_with_image_lab_and_timeout():
    lab = LabSource(name="a", path=Path("a.md"), content_hash="1" * 64)
    other_image = IMAGE.model_copy(update={"digest": "sha256:" + "b" * 64})
    keys = {
        lab_cache_key(IMAGE, lab, 60),
        lab_cache_key(other_image, lab, 60),
        lab_cache_key(IMAGE, lab.model_copy(update={"content_hash": "2" * 64}), 60),
        lab_cache_key(IMAGE, lab, 61),
    }
    assert len(keys) == 4


def test_plan_hub():
    assert plan_hub("h", None, running=False)[0] == "start"
    assert plan_hub("h", "h", running=False)[0] == "start"
    assert plan_hub("h", "h", running=True)[0] == "unchanged"
    action, reason = plan_hub("h2" * 8, "h" * 16, running=True)
    assert action == "restart" and "configuration changed" in reason


def mark(phase: str, point: str = "rp-1") -> TeardownMark:
    return TeardownMark(phase=phase, restore_point=point, since=datetime.now(UTC))


LIVE = DataFacts(exists=True, users=["ann", "bob"], files=10, bytes=1000, where="/rt")
GONE = DataFacts(exists=False, where="/rt")


def test_plan_teardown_finishes_refuses_or_starts_fresh():
    assert plan_teardown("s", None, LIVE).kind == "fresh"
    finishing = plan_teardown("s", mark("deleting"), GONE)
    assert (finishing.kind, finishing.restore_point, finishing.already_torn_down) == ("finish", "rp-1", False)
    assert plan_teardown("s", mark("torn-down"), GONE).already_torn_down
    # A restore that was interrupted left a runtime: tear that down afresh.
    assert plan_teardown("s", mark("restoring"), LIVE).kind == "fresh"
    with pytest.raises(Refused, match="nothing to tear down"):
        plan_teardown("s", None, GONE)


def test_teardown_steps_name_what_a_real_run_would_do():
    running = HubState(running=True, url="http://h", detail="pid 7")
    steps = teardown_steps(plan_teardown("s", None, LIVE), LIVE, running, ["ann"], "/bk", 3)
    verbs = [(s.verb, s.subject) for s in steps]
    assert verbs == [
        ("check", "room at /bk"), ("stop", "user servers"), ("stop", "the hub at http://h"),
        ("archive", "2 users and the hub's state"), ("delete", "/rt"), ("prune", "restore points"),
    ]
    assert steps[1].detail == "ann"
    stopped = teardown_steps(plan_teardown("s", None, LIVE), LIVE, HubState(running=False, url="http://h"), [], "/bk", 3)
    assert ("leave", "the hub") in [(s.verb, s.subject) for s in stopped]
    done = teardown_steps(plan_teardown("s", mark("torn-down"), GONE), GONE, running, [], "/bk", 3)
    assert [s.verb for s in done] == ["leave"]


def test_plan_restore():
    points = [RestorePoint(id="rp-1", path=Path("/b/rp-1"), complete=True), RestorePoint(id="rp-2", path=Path("/b/rp-2"), complete=False)]
    assert plan_restore("s", None, True, points, None).kind == "ensure-deployed"
    with pytest.raises(Refused, match="over a live site is refused"):
        plan_restore("s", None, True, points, "rp-1")
    with pytest.raises(Refused, match="nothing to restore"):
        plan_restore("s", None, False, points, None)
    decision = plan_restore("s", mark("deleting"), False, points, None)
    assert decision.point.id == "rp-1" and decision.finish_deletion
    with pytest.raises(Refused, match="rp-2 is incomplete"):
        plan_restore("s", mark("torn-down"), False, points, "rp-2")
    assert [s.verb for s in restore_steps(decision, "/rt")] == ["finish", "restore", "start"]


def _claim(name: str, disk: str | None, **extra) -> dict:
    found = {"claim": name, "namespace": "olab", "kind": "user", "phase": "Bound" if disk else "Pending",
             "volume": f"pvc-{name}" if disk else None,
             "disk": {"name": disk, "location": "europe-west2-a", "project": "p-1", "regional": False} if disk else None}
    if extra.get("disk_fields"):
        found["disk"].update(extra.pop("disk_fields"))
    return {**found, **extra}


def test_disks_to_snapshot_skip_pending_claims_and_refuse_what_a_snapshot_cannot_keep():
    from core.planning import DiskOfClaim, by_zone, disks_to_snapshot

    disks, skipped = disks_to_snapshot([_claim("claim-ann", "d-ann"), _claim("claim-new", None)], "p-1")
    assert disks == [DiskOfClaim("claim-ann", "europe-west2-a", "d-ann")] and skipped == ["claim-new"]
    assert list(by_zone(disks)) == ["europe-west2-a"]
    bad = [_claim("claim-r", "d-r", disk_fields={"regional": True}), _claim("claim-p", "d-p", disk_fields={"project": "other"}),
           {**_claim("claim-nfs", None), "phase": "Bound", "volume": "nfs-1"}]
    with pytest.raises(Refused) as refused:
        disks_to_snapshot(bad, "p-1")
    assert "d-r is regional" in str(refused.value) and "project other" in str(refused.value) and "nfs-1" in str(refused.value)


def test_claims_to_restore_need_a_ready_snapshot_of_the_same_disk():
    from core.planning import claims_to_restore

    snap = {"name": "s-ann", "status": "READY", "source_disk": "d-ann"}
    manifest = {"id": "rp-1", "claims": [_claim("claim-ann", "d-ann"), _claim("claim-new", None)], "snapshots": {"claim-ann": snap}}
    (want,) = claims_to_restore(manifest)
    assert (want.disk, want.snapshot, want.zone) == ("d-ann", "s-ann", "europe-west2-a")
    for broken in ({}, {"claim-ann": {**snap, "status": "UPLOADING"}}, {"claim-ann": {**snap, "source_disk": "d-other"}}):
        with pytest.raises(Refused, match="rp-1: no READY snapshot recorded for claim-ann"):
            claims_to_restore({**manifest, "snapshots": broken})


def test_hours_off_reads_crons_as_prefect_does():
    from core.planning import hours_off

    assert hours_off("0 19 * * 5", "0 7 * * 1", "Europe/London") == 60
    # A weekday range that wraps (Friday to Monday) is valid to Prefect, so it is read here too.
    assert hours_off("0 0 * * 5-1", "0 6 * * 1", "UTC") == 78
