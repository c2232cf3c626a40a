"""tasks/compute.py through the real compute_v1 clients (REST) against a fake Compute Engine
API on loopback: snapshots of many disks made in parallel and waited on through their
states, reruns that reuse what is there, deletions that refuse without READY snapshots,
disks restored from snapshots, errors as Google words them.

Fast: no Prefect server, no network beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import compute_v1

from core.config import GoogleApis
from core.retry import is_transient
from tasks import compute
from tests.fakes.compute import FakeCompute, parse_filter

PROJECT, ZONE = "olab-test", "europe-west2-a"
RP = "rp-20261129T190000Z-1a2b3c"
LABELS = {"olab-site": "demo", "olab-restore-point": compute.label_value(RP)}
USERS = ["claim-alice", "claim-bob", "claim-carol", "claim-dave", "claim-erin"]
HUB = "pvc-7c1e2a44-hub"


@pytest.fixture(autouse=True)
def no_threads_left():
    """Every batch joins its workers, passed or failed, and the fake stops its own."""
    before = set(threading.enumerate())
    yield
    workers = [t.name for t in threading.enumerate() if t.name.startswith("olab-compute")]
    assert not workers, f"olab's workers left running: {workers}"
    deadline = time.monotonic() + 2.0  # the fake's last request handlers end their replies
    while (left := [t.name for t in threading.enumerate() if t not in before]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not left, f"threads left running: {left}"


@pytest.fixture
def fake():
    with FakeCompute(project=PROJECT, zone=ZONE, snapshot_polls=(2, 2), disk_polls=2, operation_polls=2) as server:
        yield server
    assert not server.thread.is_alive()


@pytest.fixture
def clients(fake):
    with compute.compute_clients(GoogleApis(compute=fake.url, anonymous=True)) as made:
        yield made


@pytest.fixture
def olab_logs(caplog):
    caplog.set_level(logging.INFO, logger="olab")
    return caplog


def seed_all(fake: FakeCompute, disks=(*USERS, HUB), size_gb: int = 10, type: str = "pd-balanced") -> list[str]:
    for disk in disks:
        fake.seed_disk(disk, size_gb=size_gb, type=type, users=["gke-olab-user-pool-1a2b"])
    return list(disks)


def snap(clients, disks, rp=RP, labels=LABELS, **kwargs):
    kwargs.setdefault("timeout", 20.0)
    kwargs.setdefault("poll", 0.01)
    kwargs.setdefault("backoff", 0.01)
    return compute.snapshot_disks(clients, PROJECT, ZONE, list(disks), rp, labels, **kwargs)


def restore(clients, pairs, **kwargs):
    kwargs.setdefault("timeout", 20.0)
    kwargs.setdefault("poll", 0.01)
    kwargs.setdefault("backoff", 0.01)
    return compute.disks_from_snapshots(clients, PROJECT, ZONE, pairs, **kwargs)


def delete(clients, disks, require, **kwargs):
    kwargs.setdefault("timeout", 20.0)
    kwargs.setdefault("poll", 0.01)
    kwargs.setdefault("backoff", 0.01)
    return compute.delete_disks(clients, PROJECT, ZONE, list(disks), require_snapshots=require, **kwargs)


CREATE_SNAPSHOT = f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/disks/*/createSnapshot"
DISK_DELETE = f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/disks/*"
SNAPSHOT_ANY = f"/compute/v1/projects/{PROJECT}/global/snapshots/*"
ZONE_OPS = f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/operations/*"


# ---- pure parts ------------------------------------------------------------------------


def test_snapshot_names_are_valid_deterministic_and_distinct():
    valid = compute.NAME.fullmatch
    # Already a valid name: kept as it is.
    assert compute.snapshot_name("rp-1", "claim-alice") == "rp-1-claim-alice"
    # Uppercase (restore points have a T and a Z), or too long: lowercased, shortened, hashed.
    long_disk = "pvc-3f2d6c4e-8b1a-4a8e-9a3e-1234567890ab"
    name = compute.snapshot_name(RP, long_disk)
    assert valid(name) and len(name) <= 63 and name.startswith("rp-20261129t190000z-1a2b3c-pvc-3f2d")
    assert name == compute.snapshot_name(RP, long_disk)  # deterministic
    assert compute.snapshot_name(RP, "claim-alice") != compute.snapshot_name(RP, "claim-Alice")
    assert compute.snapshot_name(RP, long_disk) != compute.snapshot_name("rp-20261206T190000Z-4d5e6f", long_disk)
    # The shortened part alone would be the same; the hash keeps them apart.
    a, b = compute.snapshot_name(RP, long_disk + "a"), compute.snapshot_name(RP, long_disk + "b")
    assert a != b and valid(a) and valid(b)
    for odd in ("1-starts-with-a-digit", "UPPER_and_under", "x" * 200, "ends-with-dash-"):
        made = compute.snapshot_name(odd, "d")
        assert valid(made) and len(made) <= 63, made
    with pytest.raises(ValueError):
        compute.snapshot_name("", "disk")


def test_labels_are_checked_and_filtered_as_compute_has_them():
    assert compute.label_value(RP) == "rp-20261129t190000z-1a2b3c"
    assert compute.label_value("Ada Lovelace@uni.ac.uk") == "ada-lovelace-uni-ac-uk"
    long = compute.label_value("x" * 100)
    assert len(long) == 63 and compute.LABEL_VALUE.fullmatch(long)
    compute.check_labels(LABELS)
    with pytest.raises(compute.ComputeError, match="label olab-site='Demo'"):
        compute.check_labels({"olab-site": "Demo"})
    with pytest.raises(compute.ComputeError, match="label key '9lives'"):
        compute.check_labels({"9lives": "x"})
    text = compute.label_filter({"olab-site": "demo", "olab-restore-point": "rp-1"})
    assert text == '(labels.olab-restore-point = "rp-1") (labels.olab-site = "demo")'
    # The fake reads it as Compute does.
    assert parse_filter(text) == [("labels.olab-restore-point", "=", "rp-1"), ("labels.olab-site", "=", "demo")]


def test_disk_and_snapshot_info_take_the_plain_facts():
    api = "https://www.googleapis.com/compute/v1/projects/p"
    disk = compute_v1.Disk(
        name="claim-alice", zone=f"{api}/zones/{ZONE}", size_gb=20, type_=f"{api}/zones/{ZONE}/diskTypes/pd-ssd",
        status="READY", labels={"a": "b"}, users=[f"{api}/zones/{ZONE}/instances/gke-node-1"], id=42,
        source_snapshot=f"{api}/global/snapshots/s1", source_snapshot_id="7",
    )
    info = compute.disk_info(disk)
    assert (info.name, info.zone, info.size_gb, info.type, info.status) == ("claim-alice", ZONE, 20, "pd-ssd", "READY")
    assert (info.users, info.id, info.source_snapshot, info.source_snapshot_id) == (["gke-node-1"], "42", "s1", "7")
    snapshot = compute_v1.Snapshot(
        name="s1", status="UPLOADING", source_disk=f"{api}/zones/{ZONE}/disks/claim-alice", source_disk_id="42",
        disk_size_gb=20, storage_bytes=123, labels={compute.DISK_TYPE_LABEL: "pd-ssd"}, id=7,
    )
    s = compute.snapshot_info(snapshot)
    assert (s.zone, s.source_disk, s.size_gb, s.type, s.storage_bytes, s.ready) == (
        ZONE, "claim-alice", 20, "pd-ssd", 123, False
    )


# ---- snapshots ---------------------------------------------------------------------------


def test_snapshots_of_many_disks_are_made_in_parallel_and_each_waited_until_ready(olab_logs):
    with FakeCompute(project=PROJECT, zone=ZONE, snapshot_polls=(2, 3), latency=0.05) as fake:
        disks = seed_all(fake)
        with compute.compute_clients(GoogleApis(compute=fake.url, anonymous=True)) as clients:
            made = snap(clients, disks, parallel=6, log_every=0)
        assert [s.source_disk for s in made] == disks  # in the order asked
        assert [s.name for s in made] == [compute.snapshot_name(RP, d) for d in disks]
        assert all(s.status == "READY" and s.zone == ZONE and s.size_gb == 10 for s in made)
        assert all(s.labels == {**LABELS, compute.DISK_TYPE_LABEL: "pd-balanced"} and s.type == "pd-balanced" for s in made)
        assert all(s.storage_bytes > 0 for s in made)
        for s in made:  # what the fake holds, not only what olab says
            assert fake.snapshot(s.name).status == "READY"
        # Started together: several requests (each held 50 ms) at once, not one after another.
        assert fake.max_in_flight >= 3, fake.max_in_flight
        assert fake.calls(CREATE_SNAPSHOT, "POST") == len(disks)
        # Each was polled through CREATING and UPLOADING: 5 polls to READY, and one more to see it.
        assert fake.calls(ZONE_OPS, "GET") >= 5 * len(disks)
    lines = [r.getMessage() for r in olab_logs.records if r.getMessage().startswith("snapshots READY")]
    assert lines[0].startswith("snapshots READY 0 of 6") and lines[-1].startswith("snapshots READY 6 of 6")
    counts = [int(line.split()[2]) for line in lines]
    assert counts == sorted(counts)
    assert "(0 reused, 6 made" in olab_logs.text


def test_progress_is_logged_at_most_every_few_seconds(fake, clients, olab_logs):
    disks = seed_all(fake)
    snap(clients, disks, log_every=3600)
    lines = [r.getMessage() for r in olab_logs.records if r.getMessage().startswith("snapshots READY")]
    assert len(lines) == 2 and lines[0].startswith("snapshots READY 0 of 6") and lines[1].startswith("snapshots READY 6 of 6")


def test_a_rerun_reuses_the_snapshots_it_finds_ready(fake, clients, olab_logs):
    disks = seed_all(fake)
    first = snap(clients, disks)
    inserts = fake.calls(CREATE_SNAPSHOT, "POST")
    again = snap(clients, disks)
    assert again == first
    assert fake.calls(CREATE_SNAPSHOT, "POST") == inserts == len(disks)
    assert fake.calls(f"/compute/v1/projects/{PROJECT}/global/snapshots", "POST") == 0
    assert "(6 reused, 0 made" in olab_logs.text
    # Another restore point is other snapshots.
    other = snap(clients, disks[:2], rp="rp-20261206T190000Z-4d5e6f")
    assert {s.name for s in other}.isdisjoint(s.name for s in first)
    assert fake.calls(CREATE_SNAPSHOT, "POST") == len(disks) + 2


def test_a_rerun_waits_for_a_snapshot_still_creating_instead_of_making_another(fake, clients):
    disks = seed_all(fake, ["claim-alice", "claim-bob"])
    fake.seed_snapshot(compute.snapshot_name(RP, "claim-alice"), "claim-alice", status="CREATING", labels=LABELS)
    fake.seed_snapshot(compute.snapshot_name(RP, "claim-bob"), "claim-bob", status="UPLOADING", labels=LABELS)
    made = snap(clients, disks)
    assert [s.status for s in made] == ["READY", "READY"]
    assert fake.calls(CREATE_SNAPSHOT, "POST") == 0
    assert fake.calls(SNAPSHOT_ANY, "GET") >= 4  # waited through the states


def test_a_failed_snapshot_of_an_earlier_run_is_deleted_and_made_again(fake, clients, olab_logs):
    disks = seed_all(fake, ["claim-alice", "claim-bob"])
    failed = compute.snapshot_name(RP, "claim-alice")
    fake.seed_snapshot(failed, "claim-alice", status="FAILED", labels=LABELS)
    made = snap(clients, disks)
    assert [s.status for s in made] == ["READY", "READY"]
    assert fake.calls(fake.snapshot_path(failed), "DELETE") == 1
    assert fake.calls(fake.disk_path("claim-alice") + "/createSnapshot", "POST") == 1
    assert fake.calls(DISK_DELETE, "DELETE") == 0  # no disk touched
    assert "is FAILED (an earlier run's): deleting it to make it again" in olab_logs.text
    assert "1 of them again after FAILED" in olab_logs.text


def test_a_snapshot_that_fails_stops_the_batch_naming_the_disk(fake, clients):
    disks = seed_all(fake)
    fake.fail_snapshot("claim-carol", message="Snapshot creation failed: disk read error.")
    with pytest.raises(compute.ComputeError) as caught:
        snap(clients, disks)
    message = str(caught.value)
    assert "\n" not in message
    assert f"snapshot {compute.snapshot_name(RP, 'claim-carol')} of disk claim-carol" in message
    assert message.endswith("failed: INTERNAL_ERROR: Snapshot creation failed: disk read error.")
    assert fake.snapshot(compute.snapshot_name(RP, "claim-carol")).status == "FAILED"
    # Nothing deleted: not the FAILED snapshot (a rerun replaces it), not a disk.
    assert fake.calls(SNAPSHOT_ANY, "DELETE") == 0 and fake.calls(DISK_DELETE, "DELETE") == 0


def test_a_failed_snapshot_without_a_reason_is_still_named(fake, clients):
    seed_all(fake, ["claim-alice"])
    fake.fail_snapshot("claim-alice", message=None)
    with pytest.raises(compute.SnapshotFailed, match=r"of disk claim-alice FAILED \(Compute gave no reason\)$"):
        snap(clients, ["claim-alice"])
    # The rerun replaces it: deleted, made again, READY.
    (made,) = snap(clients, ["claim-alice"])
    assert made.status == "READY" and fake.calls(SNAPSHOT_ANY, "DELETE") == 1


def test_quota_exceeded_fails_at_once_with_the_apis_message(fake, clients):
    disks = seed_all(fake, ["claim-alice", "claim-bob"])
    message = fake.fail_quota(fake.disk_path("claim-bob") + "/createSnapshot", "SNAPSHOTS", times=10)
    with pytest.raises(compute.ComputeApiError) as caught:
        snap(clients, disks, backoff=5.0)
    assert str(caught.value) == (
        f"create snapshot {compute.snapshot_name(RP, 'claim-bob')} of disk claim-bob: "
        "Compute API: 403 QUOTA_EXCEEDED: Quota 'SNAPSHOTS' exceeded.  Limit: 0.0 globally."
    )
    assert message in str(caught.value)  # its own words, two spaces and all
    assert (caught.value.code, caught.value.reason) == (403, "QUOTA_EXCEEDED")
    assert not is_transient(caught.value)
    assert fake.calls(fake.disk_path("claim-bob") + "/createSnapshot") == 1


def test_after_an_error_no_further_disk_is_begun(fake, clients):
    disks = seed_all(fake, ["claim-alice", "claim-bob", "claim-carol"])
    fake.fail_quota(fake.disk_path("claim-alice") + "/createSnapshot")
    with pytest.raises(compute.ComputeApiError, match="of disk claim-alice: .*Quota 'SNAPSHOTS' exceeded"):
        snap(clients, disks, parallel=1)
    for other in disks[1:]:
        assert fake.calls(fake.snapshot_path(compute.snapshot_name(RP, other))) == 0
        assert fake.calls(fake.disk_path(other) + "*") == 0


def test_permission_denied_fails_at_once_naming_the_disk(fake, clients):
    seed_all(fake, ["claim-alice"])
    fake.fail_permission(
        fake.disk_path("claim-alice"), "compute.disks.get", f"projects/{PROJECT}/zones/{ZONE}/disks/claim-alice", times=5
    )
    expected = r"^get disk claim-alice: Compute API: 403 forbidden: Required 'compute.disks.get' permission for 'projects/"
    with pytest.raises(compute.ComputeApiError, match=expected):
        snap(clients, ["claim-alice"], backoff=5.0)
    assert fake.calls(fake.disk_path("claim-alice")) == 1
    assert fake.calls(CREATE_SNAPSHOT) == 0


def test_429_503_and_rate_limited_403_are_tried_again(fake, clients, olab_logs):
    disks = seed_all(fake, ["claim-alice", "claim-bob"])
    create_alice = fake.disk_path("claim-alice") + "/createSnapshot"
    fake.fail(create_alice, 429, times=2)
    fake.fail(fake.snapshot_path(compute.snapshot_name(RP, "claim-bob")), 503, times=2)
    fake.fail(ZONE_OPS, 403, reason="rateLimitExceeded", domain="usageLimits", message="Rate Limit Exceeded", times=1)
    made = snap(clients, disks)
    assert [s.status for s in made] == ["READY", "READY"]
    assert fake.calls(create_alice, "POST") == 3
    # Only one snapshot made of alice's disk, for all three tries.
    assert fake.snapshot_names() == sorted(compute.snapshot_name(RP, d) for d in disks)
    assert "Compute API: 429 rateLimitExceeded: Rate Limit Exceeded; trying again" in olab_logs.text
    assert "Compute API: 503 backendError: The service is currently unavailable.; trying again" in olab_logs.text


def test_transient_errors_that_outlast_the_retries_say_so(fake, clients):
    seed_all(fake, ["claim-alice"])
    fake.fail(CREATE_SNAPSHOT, 503, times=10)
    with pytest.raises(compute.ComputeUnavailable) as caught:
        snap(clients, ["claim-alice"], retries=2)
    assert is_transient(caught.value)  # a Prefect retry may try the task again
    assert str(caught.value) == (
        "Compute API: 503 backendError: The service is currently unavailable. "
        f"(create snapshot {compute.snapshot_name(RP, 'claim-alice')} of disk claim-alice: gave up after 3 attempts)"
    )


def test_a_retried_create_whose_answer_was_lost_makes_one_snapshot(fake, clients):
    seed_all(fake, ["claim-alice"])
    # The first answer is lost (502 after the fact is what a proxy does); requestId makes
    # the second ask the same request: one snapshot, one operation.
    create = fake.disk_path("claim-alice") + "/createSnapshot"
    done = []
    original = fake.answer

    def lose_first_answer(method, path, query, raw):
        status, body = original(method, path, query, raw)
        if path == create and not done:
            done.append(query["requestId"][0])
            return 502, json.dumps({"error": {"code": 502, "message": "Bad Gateway", "errors": []}})
        return status, body

    fake.answer = lose_first_answer
    (made,) = snap(clients, ["claim-alice"])
    ids = [q["requestId"][0] for m, p, q in fake.queries if p == create]
    assert len(ids) == 2 and ids[0] == ids[1] == done[0] != ""
    assert [status for m, p, status in fake.answers if p == create] == [502, 200]  # not a 409
    assert made.status == "READY" and len(fake.snapshot_names()) == 1


def test_an_operation_that_ends_in_error_names_the_disk(fake, clients):
    seed_all(fake, ["claim-alice"])
    quota = "Quota 'SNAPSHOTS' exceeded.  Limit: 1000.0 globally."
    fake.fail_next_operation("QUOTA_EXCEEDED", quota, operation_type="createSnapshot")
    with pytest.raises(compute.OperationFailed) as caught:
        snap(clients, ["claim-alice"])
    assert str(caught.value).startswith(f"snapshot {compute.snapshot_name(RP, 'claim-alice')} of disk claim-alice: operation ")
    assert str(caught.value).endswith(f"(createSnapshot) failed: QUOTA_EXCEEDED: {quota}")
    assert fake.snapshot_names() == []  # a failed operation makes nothing


def test_a_missing_disk_or_a_name_taken_by_another_disks_snapshot_is_an_error(fake, clients):
    seed_all(fake, ["claim-alice", "claim-bob"])
    with pytest.raises(compute.ComputeApiError, match="^disk claim-zed not found in olab-test/europe-west2-a"):
        snap(clients, ["claim-zed"])
    fake.seed_snapshot(compute.snapshot_name(RP, "claim-alice"), "claim-bob")
    with pytest.raises(compute.ComputeError, match=f"exists but is of disk {ZONE}/claim-bob, not {ZONE}/claim-alice"):
        snap(clients, ["claim-alice"])
    assert fake.calls(CREATE_SNAPSHOT) == 0


def test_a_slow_snapshot_runs_out_of_time_naming_the_disks_waited_for(clients):
    with FakeCompute(project=PROJECT, zone=ZONE, snapshot_polls=(1000, 1000)) as slow:
        seed_all(slow, ["claim-alice", "claim-bob"])
        with compute.compute_clients(GoogleApis(compute=slow.url, anonymous=True)) as slow_clients:
            expected = r"^snapshots READY 0 of 2 after 0\.3s; still waiting for claim-alice \(operation .* RUNNING\), claim-bob"
            with pytest.raises(compute.ComputeTimeout, match=expected):
                snap(slow_clients, ["claim-alice", "claim-bob"], timeout=0.3, poll=0.02)


# ---- deletions -------------------------------------------------------------------------


def test_delete_disks_refuses_unless_every_snapshot_exists_and_is_ready(fake, clients):
    disks = seed_all(fake, ["claim-alice", "claim-bob", "claim-carol", "claim-dave"])
    for d in disks:
        fake.set_users(d, [])
    names = {d: compute.snapshot_name(RP, d) for d in disks}
    fake.seed_snapshot(names["claim-alice"], "claim-alice", status="READY")
    fake.seed_snapshot(names["claim-bob"], "claim-bob", status="UPLOADING")
    fake.seed_snapshot(names["claim-dave"], "claim-dave", status="FAILED")
    # claim-carol: no snapshot at all.
    with pytest.raises(compute.DeletionRefused) as caught:
        delete(clients, disks, names)
    message = str(caught.value)
    assert message.startswith("refusing to delete any of 4 disk(s): ") and "\n" not in message
    assert f"snapshot {names['claim-bob']} of disk claim-bob is UPLOADING, not READY" in message
    assert f"snapshot {names['claim-carol']} of disk claim-carol does not exist" in message
    assert f"snapshot {names['claim-dave']} of disk claim-dave is FAILED, not READY" in message
    assert "claim-alice" not in message
    # Nothing deleted, not even the disk whose snapshot is fine.
    assert fake.calls(DISK_DELETE, "DELETE") == 0
    assert fake.disk_names() == sorted(disks)
    # A disk with no snapshot named for it: refused before any call.
    before = len(fake.requests)
    with pytest.raises(compute.DeletionRefused, match="no snapshot named for claim-bob$"):
        delete(clients, ["claim-alice", "claim-bob"], {"claim-alice": names["claim-alice"]})
    assert len(fake.requests) == before


def test_the_api_itself_would_delete_a_disk_whose_snapshot_is_not_ready(fake, clients):
    # What delete_disks guards against: Compute allows it.
    fake.seed_disk("claim-alice")
    fake.seed_snapshot("s1", "claim-alice", status="UPLOADING")
    op = clients.disks.delete_unary(project=PROJECT, zone=ZONE, disk="claim-alice", retry=None)
    assert op.status == compute_v1.Operation.Status.RUNNING and fake.disk("claim-alice").status == "DELETING"


def test_delete_disks_refuses_a_snapshot_of_another_or_an_earlier_disk_and_a_disk_in_use(fake, clients):
    fake.seed_disk("claim-alice")
    fake.seed_disk("claim-bob", users=["gke-olab-user-pool-9z8y"])
    fake.seed_disk("claim-carol")
    fake.seed_snapshot("snap-alice", "claim-alice")
    fake.seed_snapshot("snap-bob", "claim-bob")
    fake.seed_snapshot("snap-carol-old", "claim-carol")
    # claim-carol made again since its snapshot: same name, another disk.
    fake.set_users("claim-carol", [])
    fake.disks.pop((PROJECT, ZONE, "claim-carol"))
    fake.seed_disk("claim-carol")
    require = {"claim-alice": "snap-bob", "claim-bob": "snap-bob", "claim-carol": "snap-carol-old"}
    with pytest.raises(compute.DeletionRefused) as caught:
        delete(clients, ["claim-alice", "claim-bob", "claim-carol"], require)
    message = str(caught.value)
    assert f"snapshot snap-bob is of disk {ZONE}/claim-bob, not {ZONE}/claim-alice" in message
    assert "disk claim-bob is in use by gke-olab-user-pool-9z8y" in message
    assert "snapshot snap-carol-old is of an earlier disk claim-carol (id " in message
    assert fake.calls(DISK_DELETE, "DELETE") == 0


def test_delete_disks_deletes_once_every_snapshot_is_ready_and_a_rerun_is_fine(fake, clients, olab_logs):
    disks = seed_all(fake)
    for d in disks:
        fake.set_users(d, [])  # the user pool scaled to zero: nothing attached
    made = snap(clients, disks)
    require = {s.source_disk: s.name for s in made}
    polls = fake.calls(ZONE_OPS, "GET")
    deleted = delete(clients, disks, require, log_every=0)
    assert deleted == disks
    assert fake.disk_names() == []
    assert fake.calls(DISK_DELETE, "DELETE") == len(disks)
    assert fake.calls(ZONE_OPS, "GET") - polls >= 2 * len(disks)  # waited for the deletions
    assert "disks deleted 6 of 6" in olab_logs.text
    # Again: the disks are gone already; the snapshots are still required and still READY.
    assert delete(clients, disks, require) == []
    assert fake.calls(DISK_DELETE, "DELETE") == len(disks)


def test_a_disk_attached_meanwhile_fails_with_the_apis_message(fake, clients):
    fake.seed_disk("claim-alice")
    fake.seed_snapshot("snap-alice", "claim-alice")
    # The check passes; the disk is attached before the delete (an answer delayed to let it).
    original = fake.answer

    def attach_before_delete(method, path, query, raw):
        if method == "DELETE":
            fake.disks[(PROJECT, ZONE, "claim-alice")].msg.users = [
                f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances/gke-node-2"
            ]
        return original(method, path, query, raw)

    fake.answer = attach_before_delete
    with pytest.raises(compute.ComputeApiError) as caught:
        delete(clients, ["claim-alice"], {"claim-alice": "snap-alice"})
    assert str(caught.value) == (
        "delete disk claim-alice: Compute API: 400 resourceInUseByAnotherResource: The disk resource "
        f"'projects/{PROJECT}/zones/{ZONE}/disks/claim-alice' is already being used by "
        f"'projects/{PROJECT}/zones/{ZONE}/instances/gke-node-2'"
    )
    assert fake.disk_names() == ["claim-alice"]


# ---- restore ---------------------------------------------------------------------------


def test_disks_are_made_again_from_their_snapshots_in_the_same_zone_size_type_and_labels(fake, clients):
    fake.seed_disk("claim-alice", size_gb=10, type="pd-balanced")
    fake.seed_disk("claim-bob", size_gb=20, type="pd-standard")
    fake.seed_disk(HUB, size_gb=1, type="pd-ssd")
    disks = ["claim-alice", "claim-bob", HUB]
    made = snap(clients, disks)
    delete(clients, disks, {s.source_disk: s.name for s in made})
    assert fake.disk_names() == []
    labels = {
        "claim-alice": {"olab-site": "demo", "olab-claim": "claim-alice"},
        "claim-bob": {"olab-site": "demo", "olab-claim": "claim-bob"},
        HUB: {"olab-site": "demo", "olab-claim": "hub-db-dir"},
    }
    pairs = [(s.source_disk, s.name, labels[s.source_disk]) for s in made]
    restored = restore(clients, pairs)
    assert [d.name for d in restored] == disks
    assert [(d.zone, d.size_gb, d.type, d.status) for d in restored] == [
        (ZONE, 10, "pd-balanced", "READY"), (ZONE, 20, "pd-standard", "READY"), (ZONE, 1, "pd-ssd", "READY"),
    ]
    for d, s in zip(restored, made):
        assert d.labels == labels[d.name] and d.source_snapshot == s.name and d.source_snapshot_id == s.id
        held = fake.disk(d.name)  # what the fake holds
        assert held.status == "READY" and held.size_gb == s.size_gb and held.type_.endswith(f"/diskTypes/{s.type}")
    assert fake.calls(ZONE_OPS, "GET") >= 3 * len(disks)  # each waited through CREATING
    # A rerun finds them: no new inserts.
    inserts = fake.calls(fake.disk_path(), "POST")
    assert inserts == len(disks)
    assert restore(clients, pairs) == restored
    assert fake.calls(fake.disk_path(), "POST") == inserts


def test_a_rerun_of_the_restore_waits_for_a_disk_still_creating(fake, clients):
    fake.seed_disk("claim-alice", size_gb=15)
    (s,) = snap(clients, ["claim-alice"])
    fake.disks.pop((PROJECT, ZONE, "claim-alice"))
    fake.seed_disk("claim-alice", size_gb=15, status="CREATING", source_snapshot=s.name)
    (d,) = restore(clients, [compute.RestoreDisk("claim-alice", s.name, {"olab-site": "demo"})])
    assert d.status == "READY" and fake.calls(fake.disk_path(), "POST") == 0


def test_restore_refuses_a_disk_of_that_name_from_elsewhere_and_a_snapshot_not_ready(fake, clients):
    fake.seed_disk("claim-alice")
    fake.seed_disk("claim-bob")
    (s,) = snap(clients, ["claim-alice"])
    # claim-alice is still there, not made from the snapshot: olab will not take it for the restored one.
    with pytest.raises(compute.ComputeError, match=f"^disk claim-alice exists not from a snapshot, not from snapshot {s.name}"):
        restore(clients, [("claim-alice", s.name, {})])
    fake.seed_snapshot("snap-bob", "claim-bob", status="UPLOADING")
    with pytest.raises(compute.ComputeError, match="^disk claim-new: snapshot snap-bob is UPLOADING, not READY$"):
        restore(clients, [("claim-new", "snap-bob", {})])
    with pytest.raises(compute.ComputeApiError, match="^disk claim-new: snapshot snap-none not found"):
        restore(clients, [("claim-new", "snap-none", {})])
    fake.seed_disk("claim-west", zone="europe-west2-b")
    fake.seed_snapshot("snap-west", "claim-west", zone="europe-west2-b")
    with pytest.raises(compute.ComputeError, match=f"snapshot snap-west is of a disk in europe-west2-b, not {ZONE}"):
        restore(clients, [("claim-west", "snap-west", {})])
    assert fake.calls(fake.disk_path(), "POST") == 0 and fake.calls(DISK_DELETE, "DELETE") == 0
    assert fake.disk("claim-alice").source_snapshot == ""  # left alone


def test_a_restore_larger_than_the_snapshot_and_a_quota_error(fake, clients):
    fake.seed_disk("claim-alice", size_gb=10)
    (s,) = snap(clients, ["claim-alice"])
    fake.disks.pop((PROJECT, ZONE, "claim-alice"))
    (d,) = restore(clients, [compute.RestoreDisk("claim-alice", s.name, {}, type="pd-ssd", size_gb=30)])
    assert (d.size_gb, d.type) == (30, "pd-ssd")
    fake.fail_quota(fake.disk_path(), "SSD_TOTAL_GB", limit=500.0, method="POST")
    with pytest.raises(compute.ComputeApiError) as caught:
        restore(clients, [("claim-other", s.name, {})])
    assert str(caught.value) == (
        f"create disk claim-other from snapshot {s.name}: Compute API: 403 QUOTA_EXCEEDED: "
        "Quota 'SSD_TOTAL_GB' exceeded.  Limit: 500.0 globally."
    )


# ---- listing, retention, labels --------------------------------------------------------


def test_list_snapshots_by_labels_reads_every_page():
    with FakeCompute(project=PROJECT, zone=ZONE, page_size=2) as fake:
        seed_all(fake)
        with compute.compute_clients(GoogleApis(compute=fake.url, anonymous=True)) as clients:
            first = snap(clients, USERS, labels={"olab-site": "demo", "olab-restore-point": "rp-1"})
            snap(clients, USERS[:3], rp="rp-2", labels={"olab-site": "demo", "olab-restore-point": "rp-2"})
            fake.seed_snapshot("someone-elses", "claim-alice", labels={"team": "ops"})
            found = compute.list_snapshots(clients, PROJECT, {"olab-restore-point": "rp-1"}, backoff=0.01)
            assert [s.name for s in found] == sorted(s.name for s in first)
            assert len(compute.list_snapshots(clients, PROJECT, {"olab-site": "demo"})) == 8
            assert len(compute.list_snapshots(clients, PROJECT)) == 9
        lists = [q for m, p, q in fake.queries if p == fake.snapshot_path() and m == "GET"]
        assert lists[0]["filter"] == ['(labels.olab-restore-point = "rp-1")']
        assert len([q for q in lists if q.get("filter") == lists[0]["filter"]]) == 3  # 5 snapshots, 2 a page


def test_delete_snapshots_for_retention_deletes_only_olabs(fake, clients):
    seed_all(fake, ["claim-alice", "claim-bob"])
    names = [s.name for s in snap(clients, ["claim-alice", "claim-bob"], rp="rp-1", labels={"olab-site": "demo"})]
    fake.seed_snapshot("someone-elses", "claim-alice", labels={"team": "ops"})
    with pytest.raises(compute.DeletionRefused, match="snapshot someone-elses lacks label\\(s\\) olab-site=demo$"):
        compute.delete_snapshots(clients, PROJECT, [*names, "someone-elses"], require_labels={"olab-site": "demo"}, poll=0.01)
    assert fake.calls(SNAPSHOT_ANY, "DELETE") == 0
    gone = compute.delete_snapshots(clients, PROJECT, [*names, "never-was"], require_labels={"olab-site": "demo"}, poll=0.01)
    assert gone == names
    assert fake.snapshot_names() == ["someone-elses"]


def test_set_disk_labels_keeps_the_others_and_survives_a_concurrent_change(fake, clients):
    fake.seed_disk("claim-alice", labels={"goog-gke-volume": "", "team": "physics"})
    changed = "Labels fingerprint either invalid or resource labels have changed"
    fake.fail(fake.disk_path("claim-alice") + "/setLabels", 412, message=changed, reason="conditionNotMet")
    info = compute.set_disk_labels(clients, PROJECT, ZONE, "claim-alice", {"olab-restore-point": "rp-1"}, poll=0.01)
    assert info.labels == {"goog-gke-volume": "", "team": "physics", "olab-restore-point": "rp-1"}
    assert dict(fake.disk("claim-alice").labels) == {"goog-gke-volume": "", "team": "physics", "olab-restore-point": "rp-1"}
    assert fake.calls(fake.disk_path("claim-alice") + "/setLabels") == 2


# ---- clients and the fake itself -------------------------------------------------------


def test_clients_without_credentials_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(compute.ComputeError, match="^no Google credentials: .*gcloud auth application-default login"):
        compute.compute_clients(GoogleApis(compute="https://compute.googleapis.com"))


def test_an_unreachable_api_is_transient_and_says_so():
    from tests.conftest import free_port

    apis = GoogleApis(compute=f"http://127.0.0.1:{free_port()}", anonymous=True)
    with compute.compute_clients(apis) as nowhere:
        with pytest.raises(compute.ComputeUnavailable) as caught:
            compute.list_snapshots(nowhere, PROJECT, {"olab-site": "demo"}, retries=1, backoff=0.01)
    assert is_transient(caught.value)
    assert str(caught.value).startswith("Compute API unreachable: ConnectionError: ")
    assert str(caught.value).endswith('(list snapshots with (labels.olab-site = "demo"): gave up after 2 attempts)')


def test_the_fake_answers_as_compute_does(fake, clients):
    fake.seed_disk("claim-alice", size_gb=10, users=["gke-node-1"])
    raw = httpx.get(fake.url + fake.disk_path("claim-alice")).json()
    # 64-bit numbers as strings, string enums by name, empty fields left out.
    assert raw["sizeGb"] == "10" and raw["status"] == "READY" and "sourceSnapshot" not in raw
    op = clients.disks.create_snapshot_unary(
        request=compute_v1.CreateSnapshotDiskRequest(
            project=PROJECT, zone=ZONE, disk="claim-alice", snapshot_resource=compute_v1.Snapshot(name="s1"), request_id="r-1"
        ),
        retry=None,
    )
    raw_op = httpx.get(fake.url + f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/operations/{op.name}").json()
    assert raw_op["status"] == "RUNNING" and raw_op["operationType"] == "createSnapshot"  # a name, not 2104194
    seen = [fake.snapshot("s1").status]
    for _ in range(6):
        clients.zone_operations.wait(project=PROJECT, zone=ZONE, operation=op.name, retry=None)
        seen.append(fake.snapshot("s1").status)
    assert seen[0] == "CREATING" and "UPLOADING" in seen and seen[-1] == "READY"
    final = clients.zone_operations.get(project=PROJECT, zone=ZONE, operation=op.name, retry=None)
    assert final.status == compute_v1.Operation.Status.DONE
    # The same requestId: the same operation, no second snapshot, no 409.
    again = clients.disks.create_snapshot_unary(
        request=compute_v1.CreateSnapshotDiskRequest(
            project=PROJECT, zone=ZONE, disk="claim-alice", snapshot_resource=compute_v1.Snapshot(name="s1"), request_id="r-1"
        ),
        retry=None,
    )
    assert again.name == op.name
    with pytest.raises(api_exceptions.Conflict, match="already exists"):
        clients.disks.create_snapshot_unary(
            project=PROJECT, zone=ZONE, disk="claim-alice", snapshot_resource=compute_v1.Snapshot(name="s1"), retry=None
        )
    with pytest.raises(api_exceptions.BadRequest, match="is already being used by"):
        clients.disks.delete_unary(project=PROJECT, zone=ZONE, disk="claim-alice", retry=None)
    with pytest.raises(api_exceptions.BadRequest, match="Label value 'Bad' violates format constraints"):
        bad = compute_v1.Disk(name="d2", labels={"a": "Bad"})
        clients.disks.insert_unary(project=PROJECT, zone=ZONE, disk_resource=bad, retry=None)
    with pytest.raises(api_exceptions.BadRequest, match="Invalid list filter expression"):
        odd = compute_v1.ListSnapshotsRequest(project=PROJECT, filter="labels.a = b OR")
        list(clients.snapshots.list(request=odd, retry=None))
    # snapshots.insert (a global operation) and disks.list with a filter.
    fake.seed_disk("claim-bob", labels={"team": "physics"})
    source = f"projects/{PROJECT}/zones/{ZONE}/disks/claim-bob"
    resource = compute_v1.Snapshot(name="s2", source_disk=source)
    op = clients.snapshots.insert_unary(project=PROJECT, snapshot_resource=resource, retry=None)
    assert op.zone == "" and f"/projects/{PROJECT}/global/operations/" in op.self_link
    for _ in range(10):
        if clients.global_operations.wait(project=PROJECT, operation=op.name, retry=None).status == op.Status.DONE:
            break
    assert fake.snapshot("s2").status == "READY" and fake.snapshot("s2").source_disk.endswith("/disks/claim-bob")
    by_label = compute_v1.ListDisksRequest(project=PROJECT, zone=ZONE, filter='labels.team = "physics"')
    listed = clients.disks.list(request=by_label, retry=None)
    assert [d.name for d in listed] == ["claim-bob"]
