"""A Compute Engine v1 REST API (compute.googleapis.com) on loopback that keeps state, for
tests of tasks/compute.py through the real ``compute_v1`` clients over REST.

Every answer is built from the client library's own types (``compute_v1.Disk``,
``Snapshot``, ``Operation``, ``DiskList``, ``SnapshotList``) and serialized as the real API
does: camelCase names, fields at their defaults left out, 64-bit integers as strings
(``"sizeGb": "10"``), and enums by name. Compute declares almost every enum as a plain
string field (``Disk.status`` is a ``str``); ``Operation.status`` is the one real enum, and
proto-plus would write it as a number (``2104194`` for DONE) unless told not to, which the
real API never does. Requests are parsed with the library's types too, so a field the
client sends under a wrong name is lost here as it would be at Google.

What it models, under ``/compute/v1/projects/P/``:

* ``zones/Z/disks``: get, list (``filter``, ``maxResults``/``pageToken`` pages), insert
  (blank, or from ``sourceSnapshot``: the snapshot must be READY and no larger than the disk),
  delete, ``disks/D/createSnapshot``, ``disks/D/setLabels`` (``labelFingerprint`` checked);
* ``global/snapshots``: get, list (``filter``: ``labels.KEY = "VALUE"``, ``name``,
  ``status``; ``=``, ``!=``, ``eq``/``ne`` regular expressions, ANDed, parenthesized or
  not), insert (``sourceDisk``), delete;
* ``zones/Z/operations/OP`` and ``global/operations/OP``: get, and ``.../wait``
  (best-effort as Google documents it: it answers after one more poll, DONE or not);
* things in progress: a snapshot answers CREATING for ``snapshot_polls[0]`` polls, then
  UPLOADING for ``snapshot_polls[1]``, then READY (or FAILED, on demand: ``fail_snapshot``);
  a disk answers CREATING for ``disk_polls``, then READY; a deleted disk or snapshot
  DELETING for ``operation_polls``, then it is gone. A resource and its operation share one
  countdown: a poll of either moves both;
* the API's rules: a name taken (409 alreadyExists), a disk in use by an instance cannot be
  deleted (400 resourceInUseByAnotherResource; ``set_users`` marks a disk in use), a disk
  not READY cannot be snapshotted, a snapshot not READY cannot make a disk (400
  resourceNotReady), names and labels in GCE's format (400). Deleting a disk whose snapshot
  is not READY is allowed, as it is at Google: keeping that from happening is olab's job;
* ``requestId``: a mutation sent again with the same id answers the first one's operation
  (what makes retrying an insert safe);
* error injection: ``fail`` (the next N calls of a path, or an fnmatch pattern, answer a
  Google-style error body: ``{"error": {"code", "message", "errors": [{"message",
  "domain", "reason"}]}}``), with ``fail_quota`` and ``fail_permission`` for the 403s;
  ``fail_next_operation`` (an operation ends DONE with an error, its change not made);
* ``calls``/``counts``/``requests``/``queries``/``answers``: what was asked (and with which
  query parameters: ``filter``, ``requestId``, ...) and the HTTP status given; ``latency`` and
  ``max_in_flight``: how many requests were served at once (to see that work runs in parallel).
"""

from __future__ import annotations

import base64
import datetime
import fnmatch
import hashlib
import itertools
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

from google.cloud import compute_v1 as compute

API = "https://www.googleapis.com/compute/v1"
NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
LABEL_KEY = re.compile(r"[a-z][-_a-z0-9]{0,62}")
LABEL_VALUE = re.compile(r"[-_a-z0-9]{0,63}")
DISK_TYPES = ("pd-standard", "pd-balanced", "pd-ssd", "pd-extreme", "hyperdisk-balanced")
DEFAULT_MESSAGES = {
    400: ("Invalid request.", "invalid", "global"),
    403: ("Required 'compute.disks.get' permission for '{path}'", "forbidden", "global"),
    404: ("The resource '{path}' was not found", "notFound", "global"),
    429: ("Rate Limit Exceeded", "rateLimitExceeded", "usageLimits"),
    500: ("Internal error. Please try again or contact Google Support. (Code: '-1234567890')", "backendError", "global"),
    502: ("Bad Gateway", "backendError", "global"),
    503: ("The service is currently unavailable.", "backendError", "global"),
}


def _now() -> str:
    # Compute's timestamps: RFC 3339 with the zone as an offset.
    return datetime.datetime.now(datetime.timezone(datetime.timedelta(hours=-8))).isoformat(timespec="milliseconds")


def _short(link: str) -> str:
    return link.rstrip("/").rsplit("/", 1)[-1]


def _region(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None, domain: str = "global", details: list | None = None):
        super().__init__(message)
        self.code, self.message, self.domain, self.details = code, message, domain, details
        self.reason = reason or DEFAULT_MESSAGES.get(code, ("", "invalid", ""))[1]


def error_body(code: int, message: str, reason: str, domain: str = "global", details: list | None = None) -> dict:
    """An error as Compute Engine's v1 API words it (no ``status``, unlike newer APIs)."""
    error: dict = {"code": code, "message": message, "errors": [{"message": message, "domain": domain, "reason": reason}]}
    if details:
        error["details"] = details
    return {"error": error}


def _not_found(resource: str) -> ApiError:
    return ApiError(404, f"The resource '{resource}' was not found", "notFound")


def _not_ready(resource: str) -> ApiError:
    return ApiError(400, f"The resource '{resource}' is not ready", "resourceNotReady")


@dataclass(eq=False)
class _Work:
    """Something in progress: steps of (polls, what then happens), run in turn as anything
    that shares this work is polled."""

    steps: list[list] = field(default_factory=list)
    # The last step also waits for the clock (time.monotonic): a benchmark's modelled latency.
    not_before: float = 0.0

    def tick(self) -> None:
        if not self.steps:
            return
        self.steps[0][0] -= 1
        if self.steps[0][0] <= 0 and (len(self.steps) > 1 or time.monotonic() >= self.not_before):
            _, then = self.steps.pop(0)
            then()

    @property
    def done(self) -> bool:
        return not self.steps


@dataclass
class _Disk:
    project: str
    zone: str
    msg: compute.Disk
    work: _Work = field(default_factory=_Work)


@dataclass
class _Snapshot:
    project: str
    msg: compute.Snapshot
    work: _Work = field(default_factory=_Work)


@dataclass
class _Op:
    project: str
    zone: str | None  # None: a global operation
    msg: compute.Operation
    work: _Work


_P = r"/compute/v1/projects/(?P<project>[^/]+)"
_Z = _P + r"/zones/(?P<zone>[^/]+)"
_ROUTES = [
    ("disks", re.compile(_Z + r"/disks")),
    ("disk", re.compile(_Z + r"/disks/(?P<disk>[^/]+)")),
    ("create_snapshot", re.compile(_Z + r"/disks/(?P<disk>[^/]+)/createSnapshot")),
    ("set_labels", re.compile(_Z + r"/disks/(?P<disk>[^/]+)/setLabels")),
    ("zone_operation", re.compile(_Z + r"/operations/(?P<operation>[^/]+)")),
    ("zone_operation_wait", re.compile(_Z + r"/operations/(?P<operation>[^/]+)/wait")),
    ("snapshots", re.compile(_P + r"/global/snapshots")),
    ("snapshot", re.compile(_P + r"/global/snapshots/(?P<snapshot>[^/]+)")),
    ("global_operation", re.compile(_P + r"/global/operations/(?P<operation>[^/]+)")),
    ("global_operation_wait", re.compile(_P + r"/global/operations/(?P<operation>[^/]+)/wait")),
]
_FILTER_TERM = re.compile(
    r"""\s*(?P<open>\(\s*)?(?P<field>name|status|labels\.[a-z][-_a-z0-9]*)\s*(?P<op>!=|=|\beq\b|\bne\b)\s*"""
    r"""(?P<value>"[^"]*"|'[^']*'|[^\s()]+)\s*(?P<close>\))?\s*(?:\bAND\b\s*)?""",
    re.IGNORECASE,
)


def parse_filter(text: str) -> list[tuple[str, str, str]]:
    """(field, op, value) terms of a Compute list filter, all of which must hold; ValueError
    for anything this fake does not understand (OR, other fields)."""
    terms, pos, text = [], 0, text.strip()
    while pos < len(text):
        m = _FILTER_TERM.match(text, pos)
        if not m or m.end() == pos or bool(m["open"]) != bool(m["close"]):
            raise ValueError(text)
        value = m["value"]
        if value[:1] in "\"'" and value[-1:] == value[:1]:
            value = value[1:-1]
        terms.append((m["field"], m["op"].lower(), value))
        pos = m.end()
    return terms


def _matches(terms: list[tuple[str, str, str]], fields: Callable[[str], str | None]) -> bool:
    for name, op, value in terms:
        have = fields(name)
        if op in ("=", "!="):
            ok = have == value
        else:  # eq / ne: a regular expression over the whole value
            ok = have is not None and re.fullmatch(value, have) is not None
        if op in ("!=", "ne"):
            ok = not ok
        if not ok:
            return False
    return True


class FakeCompute:
    def __init__(
        self,
        *,
        project: str = "olab-test",
        zone: str = "europe-west2-a",
        snapshot_polls: tuple[int, int] = (2, 2),
        disk_polls: int = 2,
        operation_polls: int = 2,
        page_size: int = 500,
        latency: float = 0.0,
        disk_seconds: float = 0.0,
    ):
        if operation_polls < 1 or disk_polls < 1 or min(snapshot_polls) < 1:
            raise ValueError("polls: at least 1 (a resource answers its first state at least once)")
        self.project, self.zone = project, zone
        self.snapshot_polls, self.disk_polls, self.operation_polls = snapshot_polls, disk_polls, operation_polls
        # disk_seconds: a disk made from a snapshot takes at least that long (modelled latency).
        self.page_size, self.latency, self.disk_seconds = page_size, latency, disk_seconds
        self.disks: dict[tuple[str, str, str], _Disk] = {}
        self.snapshots: dict[tuple[str, str], _Snapshot] = {}
        self.operations: dict[str, _Op] = {}
        self.request_ids: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.queries: list[tuple[str, str, dict[str, list[str]]]] = []
        self.answers: list[tuple[str, str, int]] = []
        self.bodies: list[tuple[str, str, dict]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._failures: list[dict] = []
        self._operation_errors: list[dict] = []
        self._snapshot_failures: dict[str, str | None] = {}
        self._ids = itertools.count(7_000_000_000_000_000_001)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _handle(self, method: str) -> None:
                path, _, query = self.path.partition("?")
                path = unquote(path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode() if length else ""
                params = parse_qs(query, keep_blank_values=True)
                with fake.lock:
                    fake.requests.append((method, path))
                    fake.queries.append((method, path, params))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    if fake.latency:
                        time.sleep(fake.latency)
                    with fake.lock:
                        status, body = fake.answer(method, path, params, raw)
                        fake.answers.append((method, path, status))
                finally:
                    with fake.lock:
                        fake.in_flight -= 1
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-compute", daemon=True
        )

    def __enter__(self) -> FakeCompute:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # ---- paths -------------------------------------------------------------------------

    def disk_path(self, disk: str | None = None, zone: str | None = None, project: str | None = None) -> str:
        """``/compute/v1/projects/P/zones/Z/disks[/D]``, the path the client requests."""
        base = f"/compute/v1/projects/{project or self.project}/zones/{zone or self.zone}/disks"
        return f"{base}/{disk}" if disk else base

    def snapshot_path(self, snapshot: str | None = None, project: str | None = None) -> str:
        base = f"/compute/v1/projects/{project or self.project}/global/snapshots"
        return f"{base}/{snapshot}" if snapshot else base

    # ---- what tests use --------------------------------------------------------------

    def calls(self, path: str, method: str | None = None) -> int:
        """Requests of a path or an fnmatch pattern (query string aside), of one method or any;
        injected failures count."""
        with self.lock:
            return sum(1 for m, p in self.requests if fnmatch.fnmatchcase(p, path) and (method is None or m == method))

    def counts(self) -> Counter:
        with self.lock:
            return Counter(f"{m} {p}" for m, p in self.requests)

    def fail(
        self,
        path: str,
        code: int = 503,
        *,
        times: int = 1,
        message: str | None = None,
        reason: str | None = None,
        domain: str | None = None,
        method: str | None = None,
        details: list | None = None,
    ) -> None:
        """The next ``times`` calls of ``path`` (exact, or an fnmatch pattern; any method, or
        ``method``) answer ``code`` with Compute's error body."""
        text, why, where = DEFAULT_MESSAGES.get(code, ("error", "invalid", "global"))
        text = message or text.format(path=path.removeprefix("/compute/v1/"))
        body = error_body(code, text, reason or why, domain or where, details)
        with self.lock:
            self._failures.append({"path": path, "method": method, "left": times, "code": code, "body": body})

    def fail_quota(
        self, path: str, quota: str = "SNAPSHOTS", *, limit: float = 0.0, times: int = 1, method: str | None = None
    ) -> str:
        """403 quotaExceeded, as Compute answers a mutation over a project quota; the message."""
        message = f"Quota '{quota}' exceeded.  Limit: {limit:.1f} globally."
        details = [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "QUOTA_EXCEEDED",
            "domain": "compute.googleapis.com",
            "metadata": {
                "quota_limit": f"{quota}-per-project",
                "limit": f"{limit:g}",
                "quota_metric": f"compute.googleapis.com/{quota.lower()}",
            },
        }]
        self.fail(
            path, 403, times=times, message=message, reason="quotaExceeded", domain="usageLimits", method=method, details=details
        )
        return message

    def fail_permission(self, path: str, permission: str, resource: str, *, times: int = 1, method: str | None = None) -> str:
        """403 forbidden, as Compute answers a caller without the permission; the message."""
        message = f"Required '{permission}' permission for '{resource}'"
        self.fail(path, 403, times=times, message=message, reason="forbidden", method=method)
        return message

    def fail_next_operation(
        self, code: str, message: str, *, operation_type: str | None = None, http_status: int = 403
    ) -> None:
        """The next operation started (of ``operation_type``, or any) ends DONE with this
        error (``QUOTA_EXCEEDED``, ``ZONE_RESOURCE_POOL_EXHAUSTED``, ...), its change not made."""
        with self.lock:
            self._operation_errors.append({"code": code, "message": message, "type": operation_type, "http": http_status})

    def fail_snapshot(self, disk: str, message: str | None = "Snapshot creation failed: internal error.") -> None:
        """The next snapshot of ``disk`` goes CREATING -> UPLOADING -> FAILED and stays there;
        its operation ends DONE with ``message`` as its error (no error when None)."""
        with self.lock:
            self._snapshot_failures[disk] = message

    def seed_disk(
        self,
        name: str,
        *,
        zone: str | None = None,
        project: str | None = None,
        size_gb: int = 10,
        type: str = "pd-balanced",
        labels: dict[str, str] | None = None,
        users: list[str] | None = None,
        status: str = "READY",
        source_snapshot: str | None = None,
    ) -> compute.Disk:
        """A disk as GKE's PD CSI driver (or anyone) left it; ``users`` are instance names. A
        CREATING disk turns READY after ``disk_polls`` polls."""
        project, zone = project or self.project, zone or self.zone
        with self.lock:
            msg = self._disk_msg(project, zone, name, size_gb, type, labels or {})
            msg.status = status
            msg.users = [self._instance_link(project, zone, u) for u in users or []]
            if source_snapshot:
                msg.source_snapshot = self._snapshot_link(project, source_snapshot)
                if found := self.snapshots.get((project, source_snapshot)):
                    msg.source_snapshot_id = str(found.msg.id)
            state = _Disk(project, zone, msg)
            if status == "CREATING":

                def ready() -> None:
                    msg.status = "READY"

                state.work = _Work([[self.disk_polls, ready]])
            self.disks[(project, zone, name)] = state
            return compute.Disk(msg)

    def seed_snapshot(
        self,
        name: str,
        disk: str,
        *,
        zone: str | None = None,
        project: str | None = None,
        status: str = "READY",
        labels: dict[str, str] | None = None,
    ) -> compute.Snapshot:
        """A snapshot of a seeded disk, left in ``status`` (CREATING and UPLOADING move on
        to READY as they are polled; FAILED and READY stay)."""
        project, zone = project or self.project, zone or self.zone
        with self.lock:
            source = self._disk(project, zone, disk)
            state = self._snapshot_state(project, name, source, labels or {})
            self.snapshots[(project, name)] = state
            state.msg.status = status
            if status == "READY":
                self._snapshot_ready(state)
            elif status == "CREATING":
                state.work = self._snapshot_work(state, None)
            elif status == "UPLOADING":
                state.work = self._snapshot_work(state, None)
                state.work.steps.pop(0)
            return compute.Snapshot(state.msg)

    def set_users(self, disk: str, users: list[str], zone: str | None = None, project: str | None = None) -> None:
        """Attach the disk to these instances (names), or detach it (``[]``)."""
        project, zone = project or self.project, zone or self.zone
        with self.lock:
            self._disk(project, zone, disk).msg.users = [self._instance_link(project, zone, u) for u in users]

    def disk(self, name: str, zone: str | None = None, project: str | None = None) -> compute.Disk | None:
        with self.lock:
            found = self.disks.get((project or self.project, zone or self.zone, name))
            return compute.Disk(found.msg) if found else None

    def snapshot(self, name: str, project: str | None = None) -> compute.Snapshot | None:
        with self.lock:
            found = self.snapshots.get((project or self.project, name))
            return compute.Snapshot(found.msg) if found else None

    def disk_names(self, zone: str | None = None, project: str | None = None) -> list[str]:
        with self.lock:
            return sorted(n for (p, z, n) in self.disks if p == (project or self.project) and z == (zone or self.zone))

    def snapshot_names(self, project: str | None = None) -> list[str]:
        with self.lock:
            return sorted(n for (p, n) in self.snapshots if p == (project or self.project))

    # ---- messages ----------------------------------------------------------------------

    def _id(self) -> int:
        return next(self._ids)

    @staticmethod
    def _zone_link(project: str, zone: str) -> str:
        return f"{API}/projects/{project}/zones/{zone}"

    def _disk_link(self, project: str, zone: str, disk: str) -> str:
        return f"{self._zone_link(project, zone)}/disks/{disk}"

    def _instance_link(self, project: str, zone: str, instance: str) -> str:
        return f"{self._zone_link(project, zone)}/instances/{instance}"

    @staticmethod
    def _snapshot_link(project: str, snapshot: str) -> str:
        return f"{API}/projects/{project}/global/snapshots/{snapshot}"

    @staticmethod
    def _fingerprint(labels: dict[str, str]) -> str:
        digest = hashlib.sha256(json.dumps(sorted(labels.items())).encode()).digest()[:8]
        return base64.b64encode(digest).decode()

    def _disk_msg(self, project: str, zone: str, name: str, size_gb: int, type: str, labels: dict[str, str]) -> compute.Disk:
        return compute.Disk(
            kind="compute#disk",
            id=self._id(),
            creation_timestamp=_now(),
            name=name,
            size_gb=size_gb,
            zone=self._zone_link(project, zone),
            status="CREATING",
            self_link=self._disk_link(project, zone, name),
            type_=f"{self._zone_link(project, zone)}/diskTypes/{type}",
            labels=labels,
            label_fingerprint=self._fingerprint(labels),
            physical_block_size_bytes=4096,
            architecture="X86_64",
        )

    def _snapshot_state(self, project: str, name: str, source: _Disk, labels: dict[str, str]) -> _Snapshot:
        msg = compute.Snapshot(
            kind="compute#snapshot",
            id=self._id(),
            creation_timestamp=_now(),
            name=name,
            status="CREATING",
            source_disk=source.msg.self_link,
            source_disk_id=str(source.msg.id),
            disk_size_gb=source.msg.size_gb,
            storage_bytes=0,
            storage_bytes_status="UPDATING",
            self_link=self._snapshot_link(project, name),
            labels=labels,
            label_fingerprint=self._fingerprint(labels),
            storage_locations=[_region(source.zone)],
            snapshot_type="STANDARD",
            architecture="X86_64",
        )
        return _Snapshot(project, msg)

    @staticmethod
    def _snapshot_ready(state: _Snapshot) -> None:
        state.msg.status = "READY"
        # What a snapshot stores is what the disk holds, compressed: some of its size.
        state.msg.storage_bytes = state.msg.disk_size_gb * 1024**3 // 7
        state.msg.storage_bytes_status = "UP_TO_DATE"

    def _snapshot_work(self, state: _Snapshot, failure: tuple[bool, str | None] | None) -> _Work:
        """CREATING -> UPLOADING -> READY (or FAILED, when ``failure`` is set)."""

        def uploading() -> None:
            state.msg.status = "UPLOADING"

        def last() -> None:
            if failure:
                state.msg.status = "FAILED"
                state.msg.storage_bytes_status = "UP_TO_DATE"
            else:
                self._snapshot_ready(state)

        creating, uploading_polls = self.snapshot_polls
        return _Work([[creating, uploading], [uploading_polls, last]])

    def _start(
        self,
        project: str,
        zone: str | None,
        kind: str,
        target: str,
        target_id: int,
        work: _Work,
        *,
        undo: Callable[[], None] = lambda: None,
        error: dict | None = None,
    ) -> _Op:
        """An operation on ``work``: RUNNING until the work is done, then DONE; with
        ``error`` (or an injected one) it ends DONE with that error and ``undo`` runs."""
        if error is None:
            for i, queued in enumerate(self._operation_errors):
                if queued["type"] in (None, kind):
                    error = self._operation_errors.pop(i)
                    break
        ident = self._id()
        name = f"operation-{int(time.time() * 1000)}-{ident:x}-{ident % 0xFFFFFFFF:08x}"
        where = f"{self._zone_link(project, zone)}" if zone else f"{API}/projects/{project}/global"
        msg = compute.Operation(
            kind="compute#operation",
            id=ident,
            name=name,
            operation_type=kind,
            target_link=target,
            target_id=target_id,
            status=compute.Operation.Status.RUNNING if work.steps else compute.Operation.Status.DONE,
            user=f"olab@{project}.iam.gserviceaccount.com",
            progress=0 if work.steps else 100,
            insert_time=_now(),
            start_time=_now(),
            self_link=f"{where}/operations/{name}",
        )
        if zone:
            msg.zone = self._zone_link(project, zone)

        def done() -> None:
            msg.status = compute.Operation.Status.DONE
            msg.progress = 100
            msg.end_time = _now()
            if error:
                msg.error = compute.Error(errors=[compute.Errors(code=error["code"], message=error["message"])])
                msg.http_error_status_code = error["http"]
                reasons = {400: "BAD REQUEST", 403: "FORBIDDEN", 500: "INTERNAL SERVER ERROR"}
                msg.http_error_message = reasons.get(error["http"], "ERROR")
                undo()

        if work.steps:
            # The work's last step ends the operation too.
            step = work.steps[-1]
            then = step[1]

            def last() -> None:
                then()
                done()

            step[1] = last
        else:
            done()
        op = _Op(project, zone, msg, work)
        self.operations[name] = op
        return op

    # ---- the API ---------------------------------------------------------------------

    def answer(self, method: str, path: str, query: dict[str, list[str]], raw: str) -> tuple[int, str]:
        for rule in self._failures:
            if rule["left"] > 0 and fnmatch.fnmatchcase(path, rule["path"]) and rule["method"] in (None, method):
                rule["left"] -= 1
                return rule["code"], json.dumps(rule["body"])
        try:
            body = json.loads(raw) if raw else {}
            self.bodies.append((method, path, body))
            request_id = (query.get("requestId") or [""])[0]
            if request_id and method != "GET" and request_id in self.request_ids:
                # The same mutation again: its first answer, as it is now.
                return 200, self._json(compute.Operation(self.operations[self.request_ids[request_id]].msg))
            for kind, pattern in _ROUTES:
                if m := pattern.fullmatch(path):
                    msg = getattr(self, f"_route_{kind}")(method, raw, query, **m.groupdict())
                    if request_id and isinstance(msg, compute.Operation) and method != "GET":
                        self.request_ids[request_id] = msg.name
                    return 200, self._json(msg)
            raise ApiError(404, f"The requested URL {path} was not found on this server.", "notFound")
        except ApiError as exc:
            return exc.code, json.dumps(error_body(exc.code, exc.message, exc.reason, exc.domain, exc.details))
        except ValueError as exc:  # a body the request type does not parse
            return 400, json.dumps(error_body(400, f"Invalid JSON payload received. {exc}", "parseError"))

    @staticmethod
    def _json(msg) -> str:
        return type(msg).to_json(msg, use_integers_for_enums=False, always_print_fields_with_no_presence=False, indent=None)

    @staticmethod
    def _not_allowed(method: str) -> ApiError:
        return ApiError(405, f"Method {method} not allowed for this resource.", "httpMethodNotAllowed")

    @staticmethod
    def _check_name(name: str, field_name: str = "resource.name") -> None:
        if not name or not NAME.fullmatch(name):
            raise ApiError(
                400,
                f"Invalid value for field '{field_name}': '{name}'. "
                "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'",
                "invalid",
            )

    @staticmethod
    def _check_labels(labels: dict[str, str], field_name: str = "resource.labels") -> None:
        if len(labels) > 64:
            raise ApiError(400, f"Invalid value for field '{field_name}': ''. Too many labels (at most 64).", "invalid")
        for key, value in labels.items():
            if not LABEL_KEY.fullmatch(key):
                raise ApiError(
                    400, f"Invalid value for field '{field_name}': ''. Label key '{key}' violates format constraints. "
                    "The key must start with a lowercase character, can only contain lowercase letters, numeric characters, "
                    "underscores and dashes. The key can be at most 63 characters long. International characters are allowed.",
                    "invalid",
                )
            if not LABEL_VALUE.fullmatch(value):
                raise ApiError(
                    400, f"Invalid value for field '{field_name}': ''. Label value '{value}' violates format constraints. "
                    "The value can only contain lowercase letters, numeric characters, underscores and dashes. "
                    "The value can be at most 63 characters long. International characters are allowed.",
                    "invalid",
                )

    def _disk(self, project: str, zone: str, name: str) -> _Disk:
        found = self.disks.get((project, zone, name))
        if not found:
            raise _not_found(f"projects/{project}/zones/{zone}/disks/{name}")
        return found

    def _snapshot(self, project: str, name: str) -> _Snapshot:
        found = self.snapshots.get((project, name))
        if not found:
            raise _not_found(f"projects/{project}/global/snapshots/{name}")
        return found

    def _page(self, items: list, query: dict[str, list[str]]) -> tuple[list, str]:
        size = self.page_size
        if want := (query.get("maxResults") or [""])[0]:
            size = max(1, min(int(want), 500, size))
        start = int((query.get("pageToken") or ["0"])[0] or 0)
        rest = items[start + size:]
        return items[start:start + size], (str(start + size) if rest else "")

    @staticmethod
    def _filter(query: dict[str, list[str]]) -> list[tuple[str, str, str]]:
        text = (query.get("filter") or [""])[0]
        try:
            return parse_filter(text)
        except ValueError:
            message = f"Invalid value for field 'filter': '{text}'. Invalid list filter expression."
            raise ApiError(400, message, "invalid") from None

    @staticmethod
    def _fields(msg) -> Callable[[str], str | None]:
        def get(name: str) -> str | None:
            if name.startswith("labels."):
                return msg.labels.get(name.removeprefix("labels."))
            return getattr(msg, name)

        return get

    def _route_disks(self, method: str, raw: str, query, project: str, zone: str):
        if method == "GET":
            terms = self._filter(query)
            found = [compute.Disk(d.msg) for (p, z, _), d in sorted(self.disks.items()) if (p, z) == (project, zone)]
            items, token = self._page([d for d in found if _matches(terms, self._fields(d))], query)
            return compute.DiskList(
                kind="compute#diskList", id=f"projects/{project}/zones/{zone}/disks", items=items, next_page_token=token,
                self_link=f"{self._zone_link(project, zone)}/disks",
            )
        if method != "POST":
            raise self._not_allowed(method)
        want = compute.Disk.from_json(raw or "{}", ignore_unknown_fields=True)
        self._check_name(want.name)
        self._check_labels(dict(want.labels))
        if (project, zone, want.name) in self.disks:
            resource = f"projects/{project}/zones/{zone}/disks/{want.name}"
            raise ApiError(409, f"The resource '{resource}' already exists", "alreadyExists")
        type_name = _short(want.type_) if want.type_ else "pd-standard"
        if type_name not in DISK_TYPES or (want.type_ and "/zones/" in f"/{want.type_}" and f"zones/{zone}/" not in want.type_):
            message = f"Invalid value for field 'resource.type': '{want.type_}'. Disk type must be in zone {zone}."
            raise ApiError(400, message, "invalid")
        source = None
        if want.source_snapshot:
            snap_name = _short(want.source_snapshot)
            source = self._snapshot(project, snap_name)
            if source.msg.status != "READY":
                raise _not_ready(f"projects/{project}/global/snapshots/{snap_name}")
        size = want.size_gb if "size_gb" in want else (source.msg.disk_size_gb if source else 500)
        if source and size < source.msg.disk_size_gb:
            raise ApiError(
                400, f"Invalid value for field 'resource.sizeGb': '{size}'. Requested disk size cannot be smaller than the "
                f"snapshot size ({source.msg.disk_size_gb} GB).", "invalid",
            )
        msg = self._disk_msg(project, zone, want.name, size, type_name, dict(want.labels))
        if want.description:
            msg.description = want.description
        if source:
            msg.source_snapshot = source.msg.self_link
            msg.source_snapshot_id = str(source.msg.id)
        state = _Disk(project, zone, msg)
        self.disks[(project, zone, want.name)] = state

        def ready() -> None:
            msg.status = "READY"

        def undo() -> None:
            self.disks.pop((project, zone, want.name), None)

        state.work = _Work([[self.disk_polls, ready]], not_before=time.monotonic() + (self.disk_seconds if source else 0.0))
        return self._start(project, zone, "insert", msg.self_link, msg.id, state.work, undo=undo).msg

    def _route_disk(self, method: str, raw: str, query, project: str, zone: str, disk: str):
        state = self._disk(project, zone, disk)
        if method == "GET":
            view = compute.Disk(state.msg)
            state.work.tick()
            return view
        if method != "DELETE":
            raise self._not_allowed(method)
        if state.msg.users:
            raise ApiError(
                400, f"The disk resource 'projects/{project}/zones/{zone}/disks/{disk}' is already being used by "
                f"'{state.msg.users[0].removeprefix(API + '/')}'", "resourceInUseByAnotherResource",
            )
        if state.msg.status in ("CREATING", "DELETING"):
            raise _not_ready(f"projects/{project}/zones/{zone}/disks/{disk}")
        before = state.msg.status

        def gone() -> None:
            self.disks.pop((project, zone, disk), None)

        def undo() -> None:
            self.disks[(project, zone, disk)] = state
            state.msg.status = before

        state.msg.status = "DELETING"
        state.work = _Work([[self.operation_polls, gone]])
        return self._start(project, zone, "delete", state.msg.self_link, state.msg.id, state.work, undo=undo).msg

    def _new_snapshot(
        self, project: str, zone: str | None, kind: str, source: _Disk, want: compute.Snapshot
    ) -> compute.Operation:
        self._check_name(want.name)
        self._check_labels(dict(want.labels))
        if (project, want.name) in self.snapshots:
            resource = f"projects/{project}/global/snapshots/{want.name}"
            raise ApiError(409, f"The resource '{resource}' already exists", "alreadyExists")
        if source.msg.status != "READY":
            raise _not_ready(f"projects/{source.project}/zones/{source.zone}/disks/{source.msg.name}")
        state = self._snapshot_state(project, want.name, source, dict(want.labels))
        if want.description:
            state.msg.description = want.description
        if want.storage_locations:
            state.msg.storage_locations = list(want.storage_locations)
        disk_name = source.msg.name
        failure = None
        if disk_name in self._snapshot_failures:
            failure = (True, self._snapshot_failures.pop(disk_name))
        state.work = self._snapshot_work(state, failure)
        self.snapshots[(project, want.name)] = state
        error = None
        if failure and failure[1]:
            error = {"code": "INTERNAL_ERROR", "message": failure[1], "http": 500}

        def undo() -> None:
            if not failure:  # an operation that failed for another cause made nothing
                self.snapshots.pop((project, want.name), None)

        target = source.msg.self_link if kind == "createSnapshot" else state.msg.self_link
        target_id = source.msg.id if kind == "createSnapshot" else state.msg.id
        return self._start(project, zone, kind, target, target_id, state.work, undo=undo, error=error).msg

    def _route_create_snapshot(self, method: str, raw: str, query, project: str, zone: str, disk: str):
        if method != "POST":
            raise self._not_allowed(method)
        source = self._disk(project, zone, disk)
        want = compute.Snapshot.from_json(raw or "{}", ignore_unknown_fields=True)
        return self._new_snapshot(project, zone, "createSnapshot", source, want)

    def _route_set_labels(self, method: str, raw: str, query, project: str, zone: str, disk: str):
        if method != "POST":
            raise self._not_allowed(method)
        state = self._disk(project, zone, disk)
        want = compute.ZoneSetLabelsRequest.from_json(raw or "{}", ignore_unknown_fields=True)
        self._check_labels(dict(want.labels), "labels")
        if want.label_fingerprint != state.msg.label_fingerprint:
            raise ApiError(
                412, "Labels fingerprint either invalid or resource labels have changed", "conditionNotMet",
            )
        state.msg.labels = dict(want.labels)
        state.msg.label_fingerprint = self._fingerprint(dict(want.labels))
        return self._start(project, zone, "setLabels", state.msg.self_link, state.msg.id, _Work()).msg

    def _route_snapshots(self, method: str, raw: str, query, project: str):
        if method == "GET":
            terms = self._filter(query)
            found = [compute.Snapshot(s.msg) for (p, _), s in sorted(self.snapshots.items()) if p == project]
            items, token = self._page([s for s in found if _matches(terms, self._fields(s))], query)
            return compute.SnapshotList(
                kind="compute#snapshotList", id=f"projects/{project}/global/snapshots", items=items, next_page_token=token,
                self_link=f"{API}/projects/{project}/global/snapshots",
            )
        if method != "POST":
            raise self._not_allowed(method)
        want = compute.Snapshot.from_json(raw or "{}", ignore_unknown_fields=True)
        m = re.search(r"projects/([^/]+)/zones/([^/]+)/disks/([^/]+)$", want.source_disk or "")
        if not m:
            raise ApiError(400, f"Invalid value for field 'resource.sourceDisk': '{want.source_disk}'.", "invalid")
        source = self._disk(m[1], m[2], m[3])
        return self._new_snapshot(project, None, "insert", source, want)

    def _route_snapshot(self, method: str, raw: str, query, project: str, snapshot: str):
        state = self._snapshot(project, snapshot)
        if method == "GET":
            view = compute.Snapshot(state.msg)
            state.work.tick()
            return view
        if method != "DELETE":
            raise self._not_allowed(method)
        if state.msg.status == "DELETING":
            raise _not_ready(f"projects/{project}/global/snapshots/{snapshot}")
        before = state.msg.status

        def gone() -> None:
            self.snapshots.pop((project, snapshot), None)

        def undo() -> None:
            self.snapshots[(project, snapshot)] = state
            state.msg.status = before

        state.msg.status = "DELETING"
        state.work = _Work([[self.operation_polls, gone]])
        return self._start(project, None, "delete", state.msg.self_link, state.msg.id, state.work, undo=undo).msg

    def _operation(self, project: str, zone: str | None, operation: str) -> _Op:
        op = self.operations.get(operation)
        if not op or op.project != project or op.zone != zone:
            where = f"zones/{zone}" if zone else "global"
            raise _not_found(f"projects/{project}/{where}/operations/{operation}")
        return op

    def _poll(self, op: _Op) -> compute.Operation:
        # The answer is built first: N polls see the old state, the next one the new.
        view = compute.Operation(op.msg)
        op.work.tick()
        return view

    def _route_zone_operation(self, method: str, raw: str, query, project: str, zone: str, operation: str):
        if method != "GET":
            raise self._not_allowed(method)
        return self._poll(self._operation(project, zone, operation))

    def _route_zone_operation_wait(self, method: str, raw: str, query, project: str, zone: str, operation: str):
        if method != "POST":
            raise self._not_allowed(method)
        op = self._operation(project, zone, operation)
        op.work.tick()
        return compute.Operation(op.msg)

    def _route_global_operation(self, method: str, raw: str, query, project: str, operation: str):
        if method != "GET":
            raise self._not_allowed(method)
        return self._poll(self._operation(project, None, operation))

    def _route_global_operation_wait(self, method: str, raw: str, query, project: str, operation: str):
        if method != "POST":
            raise self._not_allowed(method)
        op = self._operation(project, None, operation)
        op.work.tick()
        return compute.Operation(op.msg)
