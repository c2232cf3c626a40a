"""Compute Engine's API for the gke target's weekend shutdown: snapshots of the persistent
disks under the students' claims (``claim-{username}``) and the hub's, disks made again
from them on restore, and the deletions between, which refuse to run without a READY
snapshot of every disk they would delete.

Plain functions around ``compute_v1`` clients over REST (no gRPC: one transport, and the
same one Private Service Connect endpoints and tests' fakes serve); the target wraps them
in Prefect tasks. As in tasks/gke.py every call is made with the library's own retry
switched off (``retry=None``) so that one policy governs: transient errors (429, 5xx,
Compute's 403 rateLimitExceeded, a dropped connection) are tried again with bounded
exponential backoff (core.retry.call_with_backoff); any other error (403 quota or
permission, 404, 400, ...) fails at once with the API's own message on one line, naming
the disk it was about, such as ``create snapshot rp-...-a1b2c3 of disk pvc-1234: Compute
API: 403 QUOTA_EXCEEDED: Quota 'SNAPSHOTS' exceeded.  Limit: 0.0 globally.``

Work on many disks runs in parallel (``parallel`` requests at a time; the snapshots
themselves all progress at Google at once), and every snapshot or disk is waited on until
READY, with progress logged at most every ``log_every`` seconds (``snapshots READY 12 of
31``). Each function is idempotent: names are deterministic per restore point, so a rerun
finds what an earlier run made and waits for it or reuses it.

Only zonal disks (GKE's zonal PD CSI volumes); regional disks are not handled here.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import hashlib
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import google.auth
import google.auth.exceptions
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1
from pydantic import BaseModel, ConfigDict

from core.config import GoogleApis
from core.logs import WaitProgress, task_logger
from core.retry import TransientError, call_with_backoff

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
# One HTTP request's own timeout (the waits have theirs).
REQUEST_TIMEOUT = 30.0
MAX_BACKOFF = 30.0
# A wait with nothing new to say still says so this often.
HEARTBEAT = 60.0
# The source disk's type, kept on each snapshot so that a restore makes the same kind of disk
# (a Snapshot records its source's size and zone, not its type).
DISK_TYPE_LABEL = "olab-disk-type"
# Compute Engine's resource names and label keys and values.
NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
LABEL_KEY = re.compile(r"[a-z][-_a-z0-9]{0,62}")
LABEL_VALUE = re.compile(r"[-_a-z0-9]{0,63}")
# 403s that Compute uses for rate limits (transient), unlike quota and permission (not).
RATE_LIMIT_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED"}
# Problems a refusal lists in full before it says "and N more".
LIST_AT_MOST = 8

T = TypeVar("T")


class ComputeError(RuntimeError):
    """Compute Engine refused, failed or took too long; the message is one line saying which."""


class ComputeApiError(ComputeError):
    """The API answered with an error that trying again will not mend (403 quota or
    permission, 404, 400, 409, ...); ``reason`` is Google's (``QUOTA_EXCEEDED``, ``notFound``)."""

    def __init__(self, message: str, code: int | None = None, reason: str = ""):
        super().__init__(message)
        self.code = code
        self.reason = reason


class ComputeUnavailable(ComputeError, TransientError):
    """Transient errors (429, 5xx, connection) that outlasted the retries: a task may try again later."""


class ComputeTimeout(ComputeError):
    """A wait ran out of time (not transient: trying again would wait as long)."""


class OperationFailed(ComputeError):
    """A Compute operation ended DONE with an error."""


class SnapshotFailed(ComputeError):
    """A snapshot this call asked for ended FAILED."""


class DeletionRefused(ComputeError):
    """A deletion olab will not make: a disk without a READY snapshot of it, or in use."""


# ---- clients ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputeClients:
    """The four clients olab uses, all REST. ``close()`` (or ``with``) closes their sessions."""

    disks: compute_v1.DisksClient
    snapshots: compute_v1.SnapshotsClient
    zone_operations: compute_v1.ZoneOperationsClient
    global_operations: compute_v1.GlobalOperationsClient

    def close(self) -> None:
        for client in (self.disks, self.snapshots, self.zone_operations, self.global_operations):
            client.transport.close()

    def __enter__(self) -> ComputeClients:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _credentials():
    try:
        credentials, _project = google.auth.default(scopes=SCOPES)
    except google.auth.exceptions.DefaultCredentialsError as exc:
        first = " ".join(str(exc).split())
        raise ComputeError(
            f"no Google credentials: {first} (run `gcloud auth application-default login`, "
            "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key)"
        ) from None
    return credentials


def compute_clients(apis: GoogleApis) -> ComputeClients:
    """Compute Engine's API clients over REST: at ``apis.compute`` when set (Private Service
    Connect, a test's fake), else Google's; anonymous only where the config allows it
    (loopback)."""
    credentials = AnonymousCredentials() if apis.anonymous else _credentials()
    options = ClientOptions(api_endpoint=apis.compute) if apis.compute else None

    def make(cls):
        return cls(credentials=credentials, transport="rest", client_options=options)

    return ComputeClients(
        disks=make(compute_v1.DisksClient),
        snapshots=make(compute_v1.SnapshotsClient),
        zone_operations=make(compute_v1.ZoneOperationsClient),
        global_operations=make(compute_v1.GlobalOperationsClient),
    )


# ---- names and labels (pure) -------------------------------------------------------------


def _digest(*parts: str, length: int = 10) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def snapshot_name(restore_point_id: str, disk: str) -> str:
    """The snapshot of ``disk`` for a restore point: ``{restore point}-{disk}`` when that is
    already a valid Compute name (lowercase letters, digits and dashes, a letter first, at
    most 63 characters); else a lowercased, shortened form of it ending in a hash of both, so
    that two disks or two restore points never share a name. Pure and deterministic."""
    if not restore_point_id or not disk:
        raise ValueError("snapshot_name: a restore point and a disk are needed")
    raw = f"{restore_point_id}-{disk}"
    if NAME.fullmatch(raw):
        return raw
    clean = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    if not clean[:1].isalpha():
        clean = f"s-{clean}"
    digest = _digest(restore_point_id, disk)
    head = clean[: 63 - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}"


def label_value(text: str) -> str:
    """``text`` as a Compute label value: lowercase letters, digits, ``_`` and ``-``, at most
    63 characters (shortened with a hash when longer). Pure."""
    clean = re.sub(r"[^a-z0-9_-]", "-", text.lower())
    if len(clean) <= 63:
        return clean
    digest = _digest(text, length=8)
    return f"{clean[: 63 - len(digest) - 1]}-{digest}"


def check_labels(labels: dict[str, str]) -> None:
    """ComputeError naming the first key or value Compute would refuse (before any call)."""
    if len(labels) > 64:
        raise ComputeError(f"{len(labels)} labels: Compute takes at most 64")
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise ComputeError(f"label key {key!r}: a lowercase letter, then lowercase letters, digits, _ or -, at most 63")
        if not LABEL_VALUE.fullmatch(value):
            raise ComputeError(f"label {key}={value!r}: lowercase letters, digits, _ or -, at most 63 (see label_value)")


def label_filter(labels: dict[str, str]) -> str:
    """Compute's list filter for resources with all these labels:
    ``(labels.olab-site = "demo") (labels.olab-restore-point = "rp-1")``. Pure."""
    check_labels(labels)
    return " ".join(f'(labels.{key} = "{value}")' for key, value in sorted(labels.items()))


# ---- disks and snapshots as olab needs them -------------------------------------------


def _short(link: str) -> str:
    return link.rstrip("/").rsplit("/", 1)[-1] if link else ""


def _zone_of(link: str) -> str:
    m = re.search(r"/zones/([^/]+)", link or "")
    return m[1] if m else ""


class DiskInfo(BaseModel):
    """A persistent disk, plain fields only; ``type`` and ``zone`` by short name, ``users``
    the instances it is attached to, ``source_snapshot`` the snapshot it was made from."""

    model_config = ConfigDict(frozen=True)

    name: str
    zone: str
    size_gb: int
    type: str
    status: str
    labels: dict[str, str] = {}
    source_snapshot: str = ""
    source_snapshot_id: str = ""
    users: list[str] = []
    id: str = ""
    self_link: str = ""


class SnapshotInfo(BaseModel):
    """A snapshot, plain fields only: ``zone``, ``source_disk`` and ``size_gb`` are its
    source disk's; ``type`` is that disk's type as olab recorded it (``DISK_TYPE_LABEL``),
    empty when unknown; ``storage_bytes`` what it takes up (final once READY)."""

    model_config = ConfigDict(frozen=True)

    name: str
    zone: str
    size_gb: int
    type: str
    status: str
    labels: dict[str, str] = {}
    source_disk: str = ""
    source_disk_id: str = ""
    storage_bytes: int = 0
    storage_locations: list[str] = []
    created: str = ""
    id: str = ""
    self_link: str = ""

    @property
    def ready(self) -> bool:
        return self.status == "READY"


def disk_info(disk: compute_v1.Disk) -> DiskInfo:
    return DiskInfo(
        name=disk.name,
        zone=_short(disk.zone),
        size_gb=disk.size_gb,
        type=_short(disk.type_),
        status=disk.status,
        labels=dict(disk.labels),
        source_snapshot=_short(disk.source_snapshot),
        source_snapshot_id=disk.source_snapshot_id,
        users=[_short(u) for u in disk.users],
        id=str(disk.id) if disk.id else "",
        self_link=disk.self_link,
    )


def snapshot_info(snapshot: compute_v1.Snapshot) -> SnapshotInfo:
    labels = dict(snapshot.labels)
    return SnapshotInfo(
        name=snapshot.name,
        zone=_zone_of(snapshot.source_disk),
        size_gb=snapshot.disk_size_gb,
        type=labels.get(DISK_TYPE_LABEL, ""),
        status=snapshot.status,
        labels=labels,
        source_disk=_short(snapshot.source_disk),
        source_disk_id=snapshot.source_disk_id,
        storage_bytes=snapshot.storage_bytes,
        storage_locations=list(snapshot.storage_locations),
        created=snapshot.creation_timestamp,
        id=str(snapshot.id) if snapshot.id else "",
        self_link=snapshot.self_link,
    )


# ---- calls and retries -----------------------------------------------------------------


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if value >= 10 else f"{value:.1f}s"


def _one_line(text: str, limit: int = 400) -> str:
    # Line breaks go; the API's own spacing stays ("exceeded.  Limit" has two spaces).
    line = re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error_parts(exc: api_exceptions.GoogleAPICallError) -> tuple[int | None, str, str]:
    """(HTTP code, Google's reason, message) of an API error, from its JSON body: the REST
    transport puts "METHOD URL: " before the message, and Compute's v1 errors carry no
    ``status``, only ``errors[].reason`` (``quotaExceeded``) and, lately, an ErrorInfo
    detail (``QUOTA_EXCEEDED``), which is preferred."""
    code = int(exc.code) if isinstance(exc.code, int) else None
    reason = exc.reason or ""
    message = exc.message or ""
    response = getattr(exc, "response", None)
    try:
        error = response.json().get("error", {}) if response is not None else {}
    except (ValueError, AttributeError):
        error = {}
    if isinstance(error, dict):
        message = error.get("message") or message
        errors = error.get("errors")
        if not reason and isinstance(errors, list) and errors and isinstance(errors[0], dict):
            reason = errors[0].get("reason") or ""
        reason = reason or error.get("status") or ""
    return code, reason, _one_line(message)


def api_message(exc: BaseException) -> str:
    """An API error as one line, in the API's own words:
    ``Compute API: 403 QUOTA_EXCEEDED: Quota 'SNAPSHOTS' exceeded.  Limit: 0.0 globally.``"""
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        code, reason, message = _error_parts(exc)
        head = " ".join(str(part) for part in (code, reason) if part)
        return f"Compute API: {head}: {message}" if head else f"Compute API: {message}"
    return f"Compute API unreachable: {type(exc).__name__}: {_one_line(str(exc))}"


_TRANSIENT = (
    api_exceptions.TooManyRequests,
    api_exceptions.ServiceUnavailable,
    api_exceptions.InternalServerError,
    api_exceptions.BadGateway,
    api_exceptions.GatewayTimeout,
    api_exceptions.DeadlineExceeded,
)


def is_transient_api_error(exc: BaseException) -> bool:
    """429 and 5xx, Compute's 403 rate limits, and a connection that failed (requests'
    errors are OSErrors); never a 403 for quota or permission."""
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        code, reason, _ = _error_parts(exc)
        return code is not None and (code >= 500 or code == 429 or (code == 403 and reason in RATE_LIMIT_REASONS))
    return isinstance(exc, (google.auth.exceptions.TransportError, OSError))


def _call(what: str, fn: Callable[[], T], deadline: float, retries: int, backoff: float) -> T:
    """One API call, tried again on transient errors; a permanent one becomes
    ComputeApiError("{what}: Compute API: ...")."""

    def permanent(exc: BaseException) -> BaseException:
        if isinstance(exc, api_exceptions.GoogleAPICallError):
            code, reason, _ = _error_parts(exc)
            return ComputeApiError(f"{what}: {api_message(exc)}", code, reason)
        return exc

    return call_with_backoff(
        what, fn, deadline=deadline, retries=retries, backoff=backoff, max_backoff=MAX_BACKOFF,
        transient=is_transient_api_error, describe=api_message, permanent=permanent, unavailable=ComputeUnavailable,
    )


@dataclass
class _Api:
    """The calls a batch makes, under one deadline and one retry policy."""

    clients: ComputeClients
    project: str
    zone: str
    deadline: float
    retries: int
    backoff: float

    def call(self, what: str, fn: Callable[[], T]) -> T:
        return _call(what, fn, self.deadline, self.retries, self.backoff)

    def maybe(self, what: str, fn: Callable[[], T]) -> T | None:
        """The call's answer, or None when the API says 404."""
        try:
            return self.call(what, fn)
        except ComputeApiError as exc:
            if exc.code == 404:
                return None
            raise

    def disk(self, name: str, what: str) -> DiskInfo | None:
        found = self.maybe(
            f"get disk {name}{what}",
            lambda: self.clients.disks.get(
                project=self.project, zone=self.zone, disk=name, retry=None, timeout=REQUEST_TIMEOUT
            ),
        )
        return disk_info(found) if found is not None else None

    def snapshot(self, name: str, what: str) -> SnapshotInfo | None:
        found = self.maybe(
            f"get snapshot {name}{what}",
            lambda: self.clients.snapshots.get(project=self.project, snapshot=name, retry=None, timeout=REQUEST_TIMEOUT),
        )
        return snapshot_info(found) if found is not None else None

    def operation(self, name: str, zonal: bool, subject: str) -> compute_v1.Operation:
        """A poll of one of our operations; OperationFailed naming ``subject`` on its error."""
        ops = self.clients

        def get() -> compute_v1.Operation:
            if zonal:
                return ops.zone_operations.get(
                    project=self.project, zone=self.zone, operation=name, retry=None, timeout=REQUEST_TIMEOUT
                )
            return ops.global_operations.get(project=self.project, operation=name, retry=None, timeout=REQUEST_TIMEOUT)

        op = self.call(f"get operation {name} for {subject}", get)
        check_operation(op, subject)
        return op


def operation_error(op: compute_v1.Operation) -> str | None:
    """An operation's error as one line (``QUOTA_EXCEEDED: Quota ...``), None without one."""
    errors = [f"{e.code}: {e.message}" if e.code else e.message for e in op.error.errors]
    if errors:
        return _one_line("; ".join(errors))
    if op.http_error_status_code and op.http_error_status_code >= 400:
        return f"HTTP {op.http_error_status_code} {op.http_error_message}".strip()
    return None


def check_operation(op: compute_v1.Operation, subject: str) -> None:
    """OperationFailed naming ``subject`` when the operation carries an error."""
    if error := operation_error(op):
        raise OperationFailed(f"{subject}: operation {op.name} ({op.operation_type}) failed: {error}")


def _done(op: compute_v1.Operation) -> bool:
    return op.status == compute_v1.Operation.Status.DONE


def _request_id() -> str:
    # One id per mutation, the same on each retry of it: Compute answers a repeat with the
    # first request's operation instead of doing it twice (or a 409).
    return str(uuid.uuid4())


# ---- parallel batches ------------------------------------------------------------------


class _Job:
    """One disk's or snapshot's part of a batch: ``start`` once, then ``step`` each poll
    until ``done``; ``state`` says where it is."""

    done = False

    @property
    def state(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError


def _each(pool: concurrent.futures.Executor, fn: Callable[[_Job], None], jobs: Sequence[_Job]) -> None:
    """``fn`` on every job, ``parallel`` at a time; after an error no further job begins,
    those under way finish, and the error of the first failed job (in order) is raised.
    Each runs in a copy of this context (a Prefect run's logger reaches worker threads)."""
    stop = threading.Event()

    def run(job: _Job) -> None:
        if stop.is_set():
            return
        try:
            fn(job)
        except BaseException:
            stop.set()
            raise

    futures = [pool.submit(contextvars.copy_context().run, run, job) for job in jobs]
    concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    if stop.is_set():
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)
        raise next(f.exception() for f in futures if not f.cancelled() and f.exception())


def _pool(parallel: int, jobs: int) -> concurrent.futures.ThreadPoolExecutor:
    """Worker threads for a batch; leaving its ``with`` joins them all."""
    if parallel < 1:
        raise ValueError(f"parallel: at least 1, not {parallel}")
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(parallel, jobs)), thread_name_prefix="olab-compute")


def _batch(
    jobs: Sequence[_Job], noun: str, *, parallel: int, deadline: float, timeout: float, poll: float, log_every: float
) -> None:
    """Start every job in parallel, then poll those not done until all are, logging
    "``noun`` n of m" as it goes; ComputeTimeout naming the laggards at the deadline."""
    progress = WaitProgress(log_every, HEARTBEAT)
    with _pool(parallel, len(jobs)) as pool:
        _each(pool, lambda job: job.start(), jobs)
        while True:
            done = sum(job.done for job in jobs)
            line = f"{noun} {done} of {len(jobs)}"
            if done == len(jobs):
                progress(line, final=True)
                return
            progress(line)
            left = deadline - time.monotonic()
            if left <= 0:
                lagging = _listing([job.state for job in jobs if not job.done], ", ")
                raise ComputeTimeout(f"{line} after {_seconds(timeout)}; still waiting for {lagging}")
            time.sleep(min(poll, left))
            _each(pool, lambda job: job.step(), [job for job in jobs if not job.done])


def _listing(items: list[str], sep: str = "; ") -> str:
    shown = sep.join(items[:LIST_AT_MOST])
    return shown + (f"{sep}and {len(items) - LIST_AT_MOST} more" if len(items) > LIST_AT_MOST else "")


# ---- snapshots of disks ----------------------------------------------------------------


class _SnapshotJob(_Job):
    def __init__(self, api: _Api, disk: str, name: str, labels: dict[str, str], description: str, location: str | None):
        self.api, self.disk, self.name = api, disk, name
        self.labels, self.description, self.location = labels, description, location
        self.of = f" of disk {disk}"
        self.operation: str | None = None  # ours, waited for: create (zonal) or delete (global)
        self.replacing = False  # a FAILED snapshot of an earlier run is being deleted
        self.made = False  # this call asked for the snapshot
        self.remade = False
        self.info: SnapshotInfo | None = None

    @property
    def done(self) -> bool:
        return bool(self.info and self.info.ready and not self.replacing)

    @property
    def reused(self) -> bool:
        return self.done and not self.made

    @property
    def state(self) -> str:
        if self.replacing:
            return f"{self.disk} (deleting FAILED {self.name})"
        if self.operation:
            return f"{self.disk} (operation {self.operation} RUNNING)"
        return f"{self.disk} ({self.info.status if self.info else 'starting'})"

    def start(self) -> None:
        found = self.api.snapshot(self.name, self.of)
        if found is None:
            self._create()
        else:
            self._examine(found)

    def step(self) -> None:
        if self.operation:
            zonal = not self.replacing
            op = self.api.operation(self.operation, zonal, f"snapshot {self.name}{self.of}")
            if not _done(op):
                return
            self.operation = None
        found = self.api.snapshot(self.name, self.of)
        if self.replacing:
            if found is None:
                self.replacing, self.info, self.remade = False, None, True
                self._create()
            return
        if found is None:
            raise ComputeError(f"snapshot {self.name}{self.of}: gone (its operation ended, the snapshot is not there)")
        self._examine(found)

    def _examine(self, found: SnapshotInfo) -> None:
        if (found.source_disk, found.zone) != (self.disk, self.api.zone):
            raise ComputeError(
                f"snapshot {self.name} exists but is of disk {found.zone}/{found.source_disk}, "
                f"not {self.api.zone}/{self.disk}: olab will not take it for this disk's"
            )
        self.info = found
        if found.status == "FAILED":
            if self.made:
                # A FAILED snapshot carries no message; its operation's error, if any, was raised already.
                raise SnapshotFailed(f"snapshot {self.name}{self.of} FAILED (Compute gave no reason)")
            task_logger().warning(
                "snapshot %s%s is FAILED (an earlier run's): deleting it to make it again", self.name, self.of
            )
            self._delete_failed()
        elif found.status == "DELETING":
            self.replacing = True

    def _delete_failed(self) -> None:
        request = compute_v1.DeleteSnapshotRequest(project=self.api.project, snapshot=self.name, request_id=_request_id())
        op = self.api.maybe(
            f"delete FAILED snapshot {self.name}{self.of}",
            lambda: self.api.clients.snapshots.delete_unary(request=request, retry=None, timeout=REQUEST_TIMEOUT),
        )
        self.replacing = True
        if op is not None:
            check_operation(op, f"delete FAILED snapshot {self.name}{self.of}")
            self.operation = op.name

    def _create(self) -> None:
        disk = self.api.disk(self.disk, "")
        if disk is None:
            where = f"{self.api.project}/{self.api.zone}"
            raise ComputeApiError(f"disk {self.disk} not found in {where}: no snapshot of it", 404, "notFound")
        if disk.status != "READY":
            raise ComputeError(f"disk {self.disk} is {disk.status}, not READY: Compute cannot snapshot it yet")
        labels = {DISK_TYPE_LABEL: disk.type, **self.labels} if disk.type else dict(self.labels)
        resource = compute_v1.Snapshot(name=self.name, labels=labels, description=self.description)
        if self.location:
            resource.storage_locations = [self.location]
        request = compute_v1.CreateSnapshotDiskRequest(
            project=self.api.project, zone=self.api.zone, disk=self.disk, snapshot_resource=resource, request_id=_request_id()
        )
        try:
            op = self.api.call(
                f"create snapshot {self.name}{self.of}",
                lambda: self.api.clients.disks.create_snapshot_unary(request=request, retry=None, timeout=REQUEST_TIMEOUT),
            )
        except ComputeApiError as exc:
            if exc.code != 409:
                raise
            # Made meanwhile (by a request whose answer was lost, or another run): look at it.
            found = self.api.snapshot(self.name, self.of)
            if found is None:
                raise
            self._examine(found)
            return
        self.made = True
        check_operation(op, f"snapshot {self.name}{self.of}")
        if not _done(op):
            self.operation = op.name


def snapshot_disks(
    clients: ComputeClients,
    project: str,
    zone: str,
    disks: list[str],
    restore_point_id: str,
    labels: dict[str, str],
    *,
    timeout: float,
    poll: float,
    parallel: int = 8,
    storage_location: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    log_every: float = 5.0,
) -> list[SnapshotInfo]:
    """A READY snapshot of each disk (zonal, in ``zone``) for the restore point, in the
    order of ``disks``; named by ``snapshot_name``, labelled ``labels`` and
    ``DISK_TYPE_LABEL``. All are started in parallel and each is waited on until READY.

    Idempotent: a snapshot of that name already READY is reused, one CREATING or UPLOADING
    is waited for, one FAILED (an earlier run's) is deleted and made again; one of that name
    but of another disk is an error. A snapshot asked for here that ends FAILED, or any
    error, stops the batch with one line naming the disk (what was started goes on at Google,
    and a rerun picks it up). Nothing else is deleted, and no disk is touched."""
    if len(set(disks)) != len(disks):
        raise ValueError(f"disks named twice: {sorted({d for d in disks if disks.count(d) > 1})}")
    check_labels(labels)
    if not disks:
        return []
    names = [snapshot_name(restore_point_id, disk) for disk in disks]
    if len(set(names)) != len(names):
        raise ComputeError(f"restore point {restore_point_id}: two disks would share a snapshot name")
    began = time.monotonic()
    api = _Api(clients, project, zone, began + timeout, retries, backoff)
    jobs = [
        _SnapshotJob(
            api, disk, name, labels, f"olab: disk {disk} ({zone}) for restore point {restore_point_id}", storage_location
        )
        for disk, name in zip(disks, names)
    ]
    task_logger().info("snapshots of %d disk(s) in %s for restore point %s", len(jobs), zone, restore_point_id)
    _batch(jobs, "snapshots READY", parallel=parallel, deadline=api.deadline, timeout=timeout, poll=poll, log_every=log_every)
    reused, remade = sum(j.reused for j in jobs), sum(j.remade for j in jobs)
    task_logger().info(
        "snapshots of %d disk(s) READY in %s (%d reused, %d made, %d of them again after FAILED), %.1f GiB stored",
        len(jobs), _seconds(time.monotonic() - began), reused, len(jobs) - reused, remade,
        sum(j.info.storage_bytes for j in jobs if j.info) / 1024**3,
    )
    return [job.info for job in jobs if job.info]


# ---- disks from snapshots --------------------------------------------------------------


class RestoreDisk(NamedTuple):
    """A disk to make from a snapshot; ``type`` (``pd-balanced``) defaults to the type the
    snapshot recorded of its source, ``size_gb`` to its source's size."""

    disk: str
    snapshot: str
    labels: dict[str, str] = {}
    type: str | None = None
    size_gb: int | None = None


class _DiskJob(_Job):
    def __init__(self, api: _Api, want: RestoreDisk):
        self.api, self.want = api, want
        self.of = f" for disk {want.disk}"
        self.source: SnapshotInfo | None = None
        self.operation: str | None = None
        self.made = False
        self.info: DiskInfo | None = None

    @property
    def done(self) -> bool:
        return bool(self.info and self.info.status == "READY")

    @property
    def state(self) -> str:
        if self.operation:
            return f"{self.want.disk} (operation {self.operation} RUNNING)"
        return f"{self.want.disk} ({self.info.status if self.info else 'starting'})"

    def start(self) -> None:
        want, zone = self.want, self.api.zone
        snap = self.api.snapshot(want.snapshot, self.of)
        if snap is None:
            raise ComputeApiError(
                f"disk {want.disk}: snapshot {want.snapshot} not found in project {self.api.project}", 404, "notFound"
            )
        if not snap.ready:
            raise ComputeError(f"disk {want.disk}: snapshot {want.snapshot} is {snap.status}, not READY")
        if snap.zone and snap.zone != zone:
            raise ComputeError(f"disk {want.disk}: snapshot {want.snapshot} is of a disk in {snap.zone}, not {zone}")
        self.source = snap
        found = self.api.disk(want.disk, "")
        if found is not None:
            self._examine(found)
        else:
            self._create()

    def step(self) -> None:
        if self.operation:
            op = self.api.operation(self.operation, True, f"disk {self.want.disk} from snapshot {self.want.snapshot}")
            if not _done(op):
                return
            self.operation = None
        found = self.api.disk(self.want.disk, "")
        if found is None:
            raise ComputeError(f"disk {self.want.disk}: gone (its operation ended, the disk is not there)")
        self._examine(found)

    def _examine(self, found: DiskInfo) -> None:
        want, source = self.want, self.source
        if found.source_snapshot != want.snapshot or (
            source and found.source_snapshot_id and source.id and found.source_snapshot_id != source.id
        ):
            origin = (
                f"from snapshot {found.source_snapshot} (id {found.source_snapshot_id})"
                if found.source_snapshot
                else "not from a snapshot"
            )
            raise ComputeError(
                f"disk {want.disk} exists {origin}, not from snapshot {want.snapshot}"
                f"{f' (id {source.id})' if source else ''}: olab will not use it in place of the restored one"
            )
        self.info = found
        if found.status in ("FAILED", "DELETING", "UNAVAILABLE"):
            raise ComputeError(f"disk {want.disk} from snapshot {want.snapshot} is {found.status}")

    def _create(self) -> None:
        want, api, source = self.want, self.api, self.source
        assert source is not None
        disk_type = want.type or source.type
        size = want.size_gb or source.size_gb
        if size < source.size_gb:
            raise ComputeError(
                f"disk {want.disk}: {size} GB is smaller than its snapshot {want.snapshot} ({source.size_gb} GB)"
            )
        resource = compute_v1.Disk(
            name=want.disk,
            source_snapshot=f"projects/{api.project}/global/snapshots/{want.snapshot}",
            size_gb=size,
            labels=dict(want.labels),
            description=f"olab: restored from snapshot {want.snapshot}",
        )
        if disk_type:
            resource.type_ = f"projects/{api.project}/zones/{api.zone}/diskTypes/{disk_type}"
        request = compute_v1.InsertDiskRequest(
            project=api.project, zone=api.zone, disk_resource=resource, request_id=_request_id()
        )
        try:
            op = api.call(
                f"create disk {want.disk} from snapshot {want.snapshot}",
                lambda: api.clients.disks.insert_unary(request=request, retry=None, timeout=REQUEST_TIMEOUT),
            )
        except ComputeApiError as exc:
            if exc.code != 409:
                raise
            found = api.disk(want.disk, "")
            if found is None:
                raise
            self._examine(found)
            return
        self.made = True
        check_operation(op, f"disk {want.disk} from snapshot {want.snapshot}")
        if not _done(op):
            self.operation = op.name


def disks_from_snapshots(
    clients: ComputeClients,
    project: str,
    zone: str,
    pairs: Iterable[RestoreDisk | tuple],
    *,
    timeout: float,
    poll: float,
    parallel: int = 8,
    retries: int = 5,
    backoff: float = 1.0,
    log_every: float = 5.0,
) -> list[DiskInfo]:
    """A READY disk in ``zone`` made from each snapshot: ``pairs`` of (disk, snapshot,
    labels[, type[, size_gb]]), in their order. The snapshot must be READY and of a disk in
    the same zone (a PersistentVolume's node affinity names it); the disk gets the source's
    size and type unless told otherwise, and ``labels``. Started in parallel, each waited on
    until READY.

    Idempotent: a disk of that name made from that snapshot is reused (waited for if still
    CREATING); one from another snapshot, or from none, is an error, and is left alone."""
    wants = [p if isinstance(p, RestoreDisk) else RestoreDisk(*p) for p in pairs]
    names = [w.disk for w in wants]
    if len(set(names)) != len(names):
        raise ValueError(f"disks named twice: {sorted({n for n in names if names.count(n) > 1})}")
    for want in wants:
        check_labels(dict(want.labels))
    if not wants:
        return []
    began = time.monotonic()
    api = _Api(clients, project, zone, began + timeout, retries, backoff)
    jobs = [_DiskJob(api, want) for want in wants]
    task_logger().info("disks from %d snapshot(s) in %s", len(jobs), zone)
    _batch(jobs, "disks READY", parallel=parallel, deadline=api.deadline, timeout=timeout, poll=poll, log_every=log_every)
    made = sum(j.made for j in jobs)
    task_logger().info(
        "%d disk(s) READY in %s (%d made, %d reused)", len(jobs), _seconds(time.monotonic() - began), made, len(jobs) - made
    )
    return [job.info for job in jobs if job.info]


# ---- deletions -------------------------------------------------------------------------


class _DeleteJob(_Job):
    """Delete a disk (zonal) or a snapshot (global) and wait until it is gone; one already
    gone is fine."""

    def __init__(self, api: _Api, kind: str, name: str):
        self.api, self.kind, self.name = api, kind, name
        self.operation: str | None = None
        self.done = False
        self.absent = False

    @property
    def state(self) -> str:
        return f"{self.name} (deleting)"

    def _request(self):
        api = self.api
        if self.kind == "disk":
            request = compute_v1.DeleteDiskRequest(project=api.project, zone=api.zone, disk=self.name, request_id=_request_id())
            return lambda: api.clients.disks.delete_unary(request=request, retry=None, timeout=REQUEST_TIMEOUT)
        request = compute_v1.DeleteSnapshotRequest(project=api.project, snapshot=self.name, request_id=_request_id())
        return lambda: api.clients.snapshots.delete_unary(request=request, retry=None, timeout=REQUEST_TIMEOUT)

    def start(self) -> None:
        op = self.api.maybe(f"delete {self.kind} {self.name}", self._request())
        if op is None:
            self.done = self.absent = True
            return
        check_operation(op, f"delete {self.kind} {self.name}")
        self.operation = op.name
        self.done = _done(op)

    def step(self) -> None:
        op = self.api.operation(self.operation or "", self.kind == "disk", f"delete {self.kind} {self.name}")
        self.done = _done(op)


def _deleted(
    api: _Api, kind: str, names: list[str], *, timeout: float, poll: float, parallel: int, log_every: float
) -> list[str]:
    jobs = [_DeleteJob(api, kind, name) for name in names]
    _batch(jobs, f"{kind}s deleted", parallel=parallel, deadline=api.deadline, timeout=timeout, poll=poll, log_every=log_every)
    return [job.name for job in jobs if not job.absent]


def _each_checked(names: list[str], check: Callable[[str], list[str]], parallel: int) -> list[str]:
    """Every problem ``check`` finds with each name, looked at in parallel, in order."""
    found: dict[str, list[str]] = {}

    def look(name: str) -> None:
        found[name] = check(name)

    with _pool(parallel, len(names)) as pool:
        futures = [pool.submit(contextvars.copy_context().run, look, name) for name in names]
        for future in futures:
            future.result()
    return [problem for name in names for problem in found[name]]


def delete_disks(
    clients: ComputeClients,
    project: str,
    zone: str,
    disks: list[str],
    *,
    require_snapshots: dict[str, str],
    timeout: float = 600.0,
    poll: float = 5.0,
    parallel: int = 8,
    retries: int = 5,
    backoff: float = 1.0,
    log_every: float = 5.0,
) -> list[str]:
    """Delete these disks, but only when every one of them has its snapshot in
    ``require_snapshots`` (disk -> snapshot name), and every such snapshot exists, is READY
    and is of this very disk (its name, zone and id: not of an earlier disk of that name),
    and no disk is attached to an instance. Everything is looked at first; any problem
    raises DeletionRefused listing them all, and nothing is deleted. A disk already gone is
    fine. The disks deleted; waits until their deletions are DONE."""
    if len(set(disks)) != len(disks):
        raise ValueError(f"disks named twice: {sorted({d for d in disks if disks.count(d) > 1})}")
    if not disks:
        return []
    unnamed = [disk for disk in disks if not require_snapshots.get(disk)]
    if unnamed:
        raise DeletionRefused(f"refusing to delete any of {len(disks)} disk(s): no snapshot named for {', '.join(unnamed)}")
    api = _Api(clients, project, zone, time.monotonic() + timeout, retries, backoff)
    gone: set[str] = set()

    def check(disk: str) -> list[str]:
        name = require_snapshots[disk]
        snap = api.snapshot(name, f" of disk {disk}")
        if snap is None:
            return [f"snapshot {name} of disk {disk} does not exist"]
        problems = []
        if not snap.ready:
            problems.append(f"snapshot {name} of disk {disk} is {snap.status}, not READY")
        if (snap.source_disk, snap.zone) != (disk, zone):
            problems.append(f"snapshot {name} is of disk {snap.zone}/{snap.source_disk}, not {zone}/{disk}")
            return problems
        found = api.disk(disk, "")
        if found is None:
            gone.add(disk)
            return problems
        if snap.source_disk_id and found.id and snap.source_disk_id != found.id:
            problems.append(
                f"snapshot {name} is of an earlier disk {disk} (id {snap.source_disk_id}), not this one (id {found.id})"
            )
        if found.users:
            problems.append(f"disk {disk} is in use by {', '.join(found.users)}")
        return problems

    problems = _each_checked(disks, check, parallel)
    if problems:
        raise DeletionRefused(f"refusing to delete any of {len(disks)} disk(s): {_listing(problems)}")
    present = [disk for disk in disks if disk not in gone]
    already = f" ({len(gone)} gone already)" if gone else ""
    task_logger().info("deleting %d disk(s) in %s, each with a READY snapshot%s", len(present), zone, already)
    if not present:
        return []
    return _deleted(api, "disk", present, timeout=timeout, poll=poll, parallel=parallel, log_every=log_every)


def list_snapshots(
    clients: ComputeClients,
    project: str,
    labels: dict[str, str] | None = None,
    *,
    timeout: float = 120.0,
    retries: int = 5,
    backoff: float = 1.0,
) -> list[SnapshotInfo]:
    """The project's snapshots with all these labels (all of them without), by name; every
    page of the listing."""
    labels = labels or {}
    request = compute_v1.ListSnapshotsRequest(project=project, max_results=500)
    if labels:
        request.filter = label_filter(labels)
    found = _call(
        f"list snapshots{' with ' + request.filter if labels else ''}",
        lambda: list(clients.snapshots.list(request=request, retry=None, timeout=REQUEST_TIMEOUT)),
        time.monotonic() + timeout,
        retries,
        backoff,
    )
    infos = [snapshot_info(s) for s in found]
    # The filter is the API's; olab holds to its own reading of it too.
    return sorted((i for i in infos if all(i.labels.get(k) == v for k, v in labels.items())), key=lambda i: i.name)


def delete_snapshots(
    clients: ComputeClients,
    project: str,
    names: list[str],
    *,
    require_labels: dict[str, str] | None = None,
    timeout: float = 600.0,
    poll: float = 5.0,
    parallel: int = 8,
    retries: int = 5,
    backoff: float = 1.0,
    log_every: float = 5.0,
) -> list[str]:
    """Delete these snapshots (retention: which ones is the caller's choice) and wait until
    they are gone; one already gone is fine. With ``require_labels``, refuses (before
    deleting any) when a snapshot lacks one of them: olab deletes only its own. The
    snapshots deleted."""
    if len(set(names)) != len(names):
        raise ValueError(f"snapshots named twice: {sorted({n for n in names if names.count(n) > 1})}")
    if not names:
        return []
    api = _Api(clients, project, "", time.monotonic() + timeout, retries, backoff)
    if require_labels:
        check_labels(require_labels)

        def check(name: str) -> list[str]:
            snap = api.snapshot(name, "")
            if snap is None:
                return []
            missing = {k: v for k, v in require_labels.items() if snap.labels.get(k) != v}
            return [f"snapshot {name} lacks label(s) {', '.join(f'{k}={v}' for k, v in missing.items())}"] if missing else []

        problems = _each_checked(names, check, parallel)
        if problems:
            raise DeletionRefused(f"refusing to delete any of {len(names)} snapshot(s): {_listing(problems)}")
    task_logger().info("deleting %d snapshot(s)", len(names))
    return _deleted(api, "snapshot", names, timeout=timeout, poll=poll, parallel=parallel, log_every=log_every)


def set_disk_labels(
    clients: ComputeClients,
    project: str,
    zone: str,
    disk: str,
    labels: dict[str, str],
    *,
    timeout: float = 120.0,
    poll: float = 1.0,
    retries: int = 5,
    backoff: float = 1.0,
) -> DiskInfo:
    """Add (or change) labels of a disk, keeping its others; Compute's label fingerprint
    guards against a concurrent change (412), after which it reads the disk and tries again."""
    check_labels(labels)
    api = _Api(clients, project, zone, time.monotonic() + timeout, retries, backoff)
    for _ in range(5):
        found = api.maybe(
            f"get disk {disk}",
            lambda: clients.disks.get(project=project, zone=zone, disk=disk, retry=None, timeout=REQUEST_TIMEOUT),
        )
        if found is None:
            raise ComputeApiError(f"disk {disk} not found in {project}/{zone}", 404, "notFound")
        merged = {**dict(found.labels), **labels}
        if merged == dict(found.labels):
            return disk_info(found)
        request = compute_v1.SetLabelsDiskRequest(
            project=project, zone=zone, resource=disk, request_id=_request_id(),
            zone_set_labels_request_resource=compute_v1.ZoneSetLabelsRequest(
                labels=merged, label_fingerprint=found.label_fingerprint
            ),
        )
        try:
            op = api.call(
                f"set labels of disk {disk}",
                lambda: clients.disks.set_labels_unary(request=request, retry=None, timeout=REQUEST_TIMEOUT),
            )
        except ComputeApiError as exc:
            if exc.code == 412:
                continue
            raise
        check_operation(op, f"set labels of disk {disk}")
        while not _done(op):
            if time.monotonic() >= api.deadline:
                raise ComputeTimeout(f"set labels of disk {disk}: operation {op.name} not done after {_seconds(timeout)}")
            time.sleep(poll)
            op = api.operation(op.name, True, f"set labels of disk {disk}")
    raise ComputeError(f"set labels of disk {disk}: its labels kept changing under olab (5 tries)")
