"""A GKE v1 REST API (container.googleapis.com) on loopback that keeps state, for tests of
tasks/gke.py through the real ``ClusterManagerClient`` over REST.

Every answer is built from the client library's own types (``container_v1.Cluster``,
``NodePool``, ``Operation``) and serialized as the real API does: camelCase names,
fields at their defaults left out, enums as numbers when the request asks for
``enum-encoding=int`` (the REST transport always does) and by name otherwise. Requests
are parsed with the library's request types too, so a field the client sends under a
wrong name would be lost here as it would be at Google.

What it models:

* clusters and node pools under ``/v1/projects/P/locations/L/...``: get, list, create,
  delete; ``nodePools/N:setSize``; ``operations/OP``;
* things in progress: a created cluster answers PROVISIONING (its pools too), a pool being
  created PROVISIONING, resized RECONCILING, deleted STOPPING, until their operation is
  done. An operation answers RUNNING to ``operation_polls`` polls, then DONE; a poll of its
  cluster or pool counts too (one shared countdown), so a client really polls several times;
* a cluster seeded as terraform left it (``seed_cluster``), with its own countdown from one
  status to another (PROVISIONING -> RUNNING, RECONCILING -> RUNNING, PROVISIONING -> ERROR);
* a mutation while the cluster runs another operation: 400 FAILED_PRECONDITION, as GKE does;
* error injection (``fail``): the next N calls of a path answer a Google-style error body;
* ``POST /token``: an OAuth token endpoint, so a service-account key whose ``token_uri``
  points here gets a real refresh through google-auth (``access_token``);
* ``calls(path)``: how many requests a path got (injected failures included).

Node counts: GKE's NodePool has no current size (only ``initialNodeCount``, the size at
creation, which setSize does not change); the fake keeps the real size in its own state
(``pool_size``) and reports the cluster's total in ``currentNodeCount``, as GKE does.
"""

from __future__ import annotations

import base64
import datetime
import functools
import itertools
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from google.cloud import container_v1 as gke
from google.rpc import status_pb2

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
DEFAULT_MESSAGES = {
    403: "Required 'container.clusters.get' permission(s) for '{path}'.",
    429: "Quota exceeded for quota metric 'Requests' of service 'container.googleapis.com'.",
    500: "Internal error encountered.",
    503: "The service is currently unavailable.",
}
# google.rpc.Code numbers, as an Operation's error carries them.
RPC_CODES = {"FAILED_PRECONDITION": 9, "RESOURCE_EXHAUSTED": 8, "INTERNAL": 13, "UNAVAILABLE": 14}
MASTER_VERSION = "1.31.5-gke.1023000"


@functools.lru_cache(maxsize=1)
def fake_ca_pem() -> str:
    """A self-signed CA certificate (PEM), made once per test session."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-gke-cluster-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def fake_ca_base64() -> str:
    """The CA as GKE gives it in masterAuth.clusterCaCertificate: base64 of the PEM."""
    return base64.b64encode(fake_ca_pem().encode()).decode()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class SeedPool:
    """A node pool as terraform made it; ``status`` turns into ``then`` after ``polls`` polls."""

    name: str
    nodes: int = 1
    min_nodes: int | None = None
    max_nodes: int | None = None  # set: autoscaling on, between min_nodes (or 0) and max_nodes
    machine_type: str = "e2-standard-2"
    status: str = "RUNNING"
    polls: int = 0
    then: str = "RUNNING"
    message: str = ""


@dataclass(eq=False)
class _Work:
    """Something in progress: done after ``polls`` more polls of anything that shares it,
    and not before the clock says ``not_before`` (time.monotonic; modelled latency)."""

    polls: int
    finish: Callable[[], None]
    done: bool = False
    not_before: float = 0.0

    def tick(self) -> None:
        if self.done:
            return
        self.polls -= 1
        if self.polls <= 0 and time.monotonic() >= self.not_before:
            self.done = True
            self.finish()


@dataclass
class _Pool:
    msg: gke.NodePool
    size: int
    work: _Work | None = None


@dataclass
class _Cluster:
    project: str
    location: str
    msg: gke.Cluster
    pools: dict[str, _Pool] = field(default_factory=dict)
    work: _Work | None = None
    operation: str | None = None  # the mutation in progress, if any

    def busy(self, ops: dict[str, _Op]) -> str | None:
        op = ops.get(self.operation or "")
        return op.msg.name if op and not op.work.done else None


@dataclass
class _Op:
    msg: gke.Operation
    work: _Work


class ApiError(Exception):
    def __init__(self, code: int, message: str, status: str | None = None):
        self.code, self.message, self.status = code, message, status or STATUS_NAMES.get(code, "UNKNOWN")


def error_body(code: int, message: str, status: str | None = None, details: list | None = None) -> dict:
    error = {"code": code, "message": message, "status": status or STATUS_NAMES.get(code, "UNKNOWN")}
    if details:
        error["details"] = details
    return {"error": error}


_BASE = r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
_ROUTES = [
    ("clusters", re.compile(_BASE + r"/clusters")),
    ("cluster", re.compile(_BASE + r"/clusters/(?P<cluster>[^/:]+)")),
    ("pools", re.compile(_BASE + r"/clusters/(?P<cluster>[^/:]+)/nodePools")),
    ("pool", re.compile(_BASE + r"/clusters/(?P<cluster>[^/:]+)/nodePools/(?P<pool>[^/:]+)")),
    ("set_size", re.compile(_BASE + r"/clusters/(?P<cluster>[^/:]+)/nodePools/(?P<pool>[^/:]+):setSize")),
    ("operation", re.compile(_BASE + r"/operations/(?P<operation>[^/]+)")),
]


class FakeGke:
    def __init__(
        self,
        *,
        project: str = "olab-test",
        location: str = "europe-west2-a",
        operation_polls: int = 3,
        access_token: str = "ya29.fake-access-token",
        operation_seconds: dict[str, float] | None = None,
        cluster_endpoint: str | None = None,
        cluster_ca: str | None = None,
    ):
        """``operation_seconds``: an operation of that type (CREATE_CLUSTER, CREATE_NODE_POOL,
        DELETE_CLUSTER, ...) also takes at least that long (a benchmark's modelled latency).
        ``cluster_endpoint``/``cluster_ca``: what a cluster created through the API answers
        once RUNNING (a test's fake Kubernetes API), instead of a made-up public address.
        ``on_cluster_deleted``: callables run (with the cluster's name) when a deletion is done."""
        if operation_polls < 1:
            raise ValueError("operation_polls: at least 1 (an operation answers RUNNING at least once)")
        self.project = project
        self.location = location
        self.operation_polls = operation_polls
        self.operation_seconds = dict(operation_seconds or {})
        self.cluster_endpoint, self.cluster_ca = cluster_endpoint, cluster_ca
        self.on_cluster_deleted: list[Callable[[str], None]] = []
        self.access_token = access_token
        self.clusters: dict[tuple[str, str, str], _Cluster] = {}
        self.operations: dict[str, _Op] = {}
        self.requests: list[tuple[str, str]] = []
        self.authorizations: list[str | None] = []
        self.bodies: list[tuple[str, str, dict]] = []
        self._failures: list[dict] = []
        self._operation_errors: list[str] = []
        self._ids = itertools.count(1)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                path, _, query = self.path.partition("?")
                path, query = unquote(path), unquote(query)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode() if length else ""
                with fake.lock:
                    fake.requests.append((method, path))
                    fake.authorizations.append(self.headers.get("Authorization"))
                    status, body = fake.answer(method, path, query, raw)
                self._send(status, body)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

            def do_PUT(self) -> None:
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.token_uri = f"{self.url}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeGke:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- what tests use --------------------------------------------------------------

    def cluster_path(self, cluster: str, project: str | None = None, location: str | None = None) -> str:
        return f"/v1/projects/{project or self.project}/locations/{location or self.location}/clusters/{cluster}"

    def pool_path(self, cluster: str, pool: str, project: str | None = None, location: str | None = None) -> str:
        return f"{self.cluster_path(cluster, project, location)}/nodePools/{pool}"

    def calls(self, path: str, method: str | None = None) -> int:
        """Requests a path got (its query string aside), of one method or any."""
        with self.lock:
            return sum(1 for m, p in self.requests if p == path and (method is None or m == method))

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
        status: str | None = None,
        method: str | None = None,
        details: list | None = None,
    ) -> None:
        """The next ``times`` calls of ``path`` (any method, or ``method``) answer ``code``
        with a Google-style error body."""
        text = message or DEFAULT_MESSAGES.get(code, STATUS_NAMES.get(code, "error")).format(path=path.removeprefix("/v1/"))
        with self.lock:
            self._failures.append(
                {"path": path, "method": method, "left": times, "body": error_body(code, text, status, details), "code": code}
            )

    def fail_next_operation(self, message: str) -> None:
        """The next operation started ends DONE with this error, its change not made."""
        with self.lock:
            self._operation_errors.append(message)

    def seed_cluster(
        self,
        name: str,
        pools: list[SeedPool],
        *,
        project: str | None = None,
        location: str | None = None,
        status: str = "RUNNING",
        polls: int = 0,
        then: str = "RUNNING",
        message: str = "",
        endpoint: str = "34.89.10.20",
        ca_certificate: str | None = None,
    ) -> None:
        """A cluster as terraform left it: ``status`` for ``polls`` polls, then ``then``
        (with ``message`` as its status message and condition when that is ERROR or DEGRADED)."""
        project, location = project or self.project, location or self.location
        msg = self._cluster_msg(project, location, name, status)
        msg.endpoint = endpoint
        msg.master_auth = gke.MasterAuth(cluster_ca_certificate=ca_certificate if ca_certificate is not None else fake_ca_base64())
        state = _Cluster(project, location, msg)
        if status in ("ERROR", "DEGRADED") and message:
            self._set_problem(msg, message)
        if polls:
            def finish(c: gke.Cluster = msg, then: str = then, message: str = message) -> None:
                c.status = gke.Cluster.Status[then]
                if then in ("ERROR", "DEGRADED"):
                    self._set_problem(c, message or f"cluster is {then}")

            state.work = _Work(polls, finish)
        for seed in pools:
            pool = _Pool(self._pool_msg(project, location, name, seed), seed.nodes)
            if seed.polls:
                def finish_pool(p: gke.NodePool = pool.msg, seed: SeedPool = seed) -> None:
                    p.status = gke.NodePool.Status[seed.then]
                    if seed.then == "ERROR":
                        p.status_message = seed.message or "node pool is ERROR"
                        p.conditions = [gke.StatusCondition(message=p.status_message)]

                pool.work = _Work(seed.polls, finish_pool)
            state.pools[seed.name] = pool
        with self.lock:
            self.clusters[(project, location, name)] = state

    def pool_size(self, cluster: str, pool: str, project: str | None = None, location: str | None = None) -> int:
        with self.lock:
            return self._lookup(project or self.project, location or self.location, cluster).pools[pool].size

    def cluster_status(self, cluster: str, project: str | None = None, location: str | None = None) -> str | None:
        with self.lock:
            found = self.clusters.get((project or self.project, location or self.location, cluster))
            return found.msg.status.name if found else None

    # ---- messages ----------------------------------------------------------------------

    @staticmethod
    def _self_link(project: str, location: str, rest: str) -> str:
        # GKE's selfLinks still spell a location "zones", for regions too.
        return f"https://container.googleapis.com/v1/projects/{project}/zones/{location}/{rest}"

    def _cluster_msg(self, project: str, location: str, name: str, status: str) -> gke.Cluster:
        return gke.Cluster(
            name=name,
            location=location,
            zone=location,
            self_link=self._self_link(project, location, f"clusters/{name}"),
            status=gke.Cluster.Status[status],
            create_time=_now(),
            current_master_version=MASTER_VERSION,
            current_node_version=MASTER_VERSION,
            initial_cluster_version=MASTER_VERSION,
            id=f"{next(self._ids):032x}",
            release_channel=gke.ReleaseChannel(channel=gke.ReleaseChannel.Channel.REGULAR),
        )

    def _pool_msg(self, project: str, location: str, cluster: str, seed: SeedPool) -> gke.NodePool:
        msg = gke.NodePool(
            name=seed.name,
            initial_node_count=seed.nodes,
            config=gke.NodeConfig(machine_type=seed.machine_type, disk_size_gb=100),
            locations=[location] if location.count("-") == 2 else [],
            self_link=self._self_link(project, location, f"clusters/{cluster}/nodePools/{seed.name}"),
            version=MASTER_VERSION,
            status=gke.NodePool.Status[seed.status],
            management=gke.NodeManagement(auto_upgrade=True, auto_repair=True),
        )
        if seed.max_nodes is not None:
            msg.autoscaling = gke.NodePoolAutoscaling(
                enabled=True, min_node_count=seed.min_nodes or 0, max_node_count=seed.max_nodes
            )
        if seed.status == "ERROR" and seed.message:
            msg.status_message = seed.message
            msg.conditions = [gke.StatusCondition(message=seed.message)]
        return msg

    @staticmethod
    def _set_problem(msg: gke.Cluster, message: str) -> None:
        msg.status_message = message
        msg.conditions = [gke.StatusCondition(message=message)]

    def _pool(self, cluster: _Cluster, name: str) -> _Pool:
        if name not in cluster.pools:
            raise ApiError(
                404, f"Not found: projects/{cluster.project}/zones/{cluster.location}/clusters/{cluster.msg.name}/nodePools/{name}."
            )
        return cluster.pools[name]

    def _cluster_view(self, state: _Cluster) -> gke.Cluster:
        msg = gke.Cluster(state.msg)
        msg.node_pools = [gke.NodePool(p.msg) for p in state.pools.values()]
        msg.current_node_count = sum(p.size for p in state.pools.values())
        return msg

    def _start(self, state: _Cluster, kind: str, target: str, finish: Callable[[], None], failed: Callable[[], None]) -> _Op:
        """An operation on a cluster: RUNNING for ``operation_polls`` polls, then DONE."""
        if busy := state.busy(self.operations):
            raise ApiError(400, f"Cluster is running incompatible operation {busy}.", "FAILED_PRECONDITION")
        name = f"operation-{next(self._ids)}-{state.msg.id[-8:]}"
        msg = gke.Operation(
            name=name,
            zone=state.location,
            location=state.location,
            operation_type=gke.Operation.Type[kind],
            status=gke.Operation.Status.RUNNING,
            self_link=self._self_link(state.project, state.location, f"operations/{name}"),
            target_link=self._self_link(state.project, state.location, target),
            start_time=_now(),
        )
        error = self._operation_errors.pop(0) if self._operation_errors else None

        def done() -> None:
            msg.status = gke.Operation.Status.DONE
            msg.end_time = _now()
            if error:
                msg.error = status_pb2.Status(code=RPC_CODES["RESOURCE_EXHAUSTED"], message=error)
                msg.status_message = error
                failed()
            else:
                finish()

        op = _Op(msg, _Work(self.operation_polls, done, not_before=time.monotonic() + self.operation_seconds.get(kind, 0.0)))
        self.operations[name] = op
        state.operation = name
        return op

    # ---- the API ---------------------------------------------------------------------

    def answer(self, method: str, path: str, query: str, raw: str) -> tuple[int, str]:
        for rule in self._failures:
            if rule["left"] > 0 and rule["path"] == path and rule["method"] in (None, method):
                rule["left"] -= 1
                return rule["code"], json.dumps(rule["body"])
        ints = "enum-encoding=int" in query
        try:
            if path == "/token" and method == "POST":
                return 200, json.dumps({"access_token": self.access_token, "expires_in": 3599, "token_type": "Bearer"})
            body = json.loads(raw) if raw else {}
            self.bodies.append((method, path, body))
            for kind, pattern in _ROUTES:
                if m := pattern.fullmatch(path):
                    msg = getattr(self, f"_route_{kind}")(method, raw, **m.groupdict())
                    return 200, type(msg).to_json(msg, use_integers_for_enums=ints, always_print_fields_with_no_presence=False)
            raise ApiError(404, f"The requested URL {path} was not found on this server.")
        except ApiError as exc:
            return exc.code, json.dumps(error_body(exc.code, exc.message, exc.status))
        except ValueError as exc:  # a body the request type does not parse
            return 400, json.dumps(error_body(400, f"Invalid JSON payload received. {exc}"))

    def _not_allowed(self, method: str) -> ApiError:
        return ApiError(404, f"Method {method} not found for this path.")

    def _route_clusters(self, method: str, raw: str, project: str, location: str):
        if method == "GET":
            found = [self._cluster_view(c) for (p, l, _), c in sorted(self.clusters.items()) if (p, l) == (project, location)]
            return gke.ListClustersResponse(clusters=found)
        if method != "POST":
            raise self._not_allowed(method)
        want = gke.CreateClusterRequest.from_json(raw or "{}", ignore_unknown_fields=True).cluster
        if not want.name:
            raise ApiError(400, "Cluster.name must be specified.")
        if (project, location, want.name) in self.clusters:
            raise ApiError(409, f"Already exists: projects/{project}/locations/{location}/clusters/{want.name}.")
        seeds = [
            SeedPool(
                p.name,
                p.initial_node_count,
                p.autoscaling.min_node_count if p.autoscaling.enabled else None,
                p.autoscaling.max_node_count if p.autoscaling.enabled else None,
                p.config.machine_type or "e2-medium",
                status="PROVISIONING",
            )
            for p in want.node_pools
        ]
        if not seeds:
            if want.initial_node_count <= 0:
                raise ApiError(400, "Cluster.initial_node_count must be greater than zero.")
            seeds = [SeedPool("default-pool", want.initial_node_count, machine_type="e2-medium", status="PROVISIONING")]
        msg = self._cluster_msg(project, location, want.name, "PROVISIONING")
        state = _Cluster(project, location, msg)
        for seed in seeds:
            state.pools[seed.name] = _Pool(self._pool_msg(project, location, want.name, seed), seed.nodes)
        self.clusters[(project, location, want.name)] = state

        def finish() -> None:
            # The endpoint and CA appear once the control plane is up.
            msg.status = gke.Cluster.Status.RUNNING
            msg.endpoint = self.cluster_endpoint or f"34.89.{next(self._ids) % 250}.{next(self._ids) % 250}"
            msg.master_auth = gke.MasterAuth(cluster_ca_certificate=self.cluster_ca or fake_ca_base64())
            for pool in state.pools.values():
                pool.msg.status = gke.NodePool.Status.RUNNING

        def failed() -> None:
            self._set_problem(msg, "cluster creation failed")
            msg.status = gke.Cluster.Status.ERROR

        op = self._start(state, "CREATE_CLUSTER", f"clusters/{want.name}", finish, failed)
        state.work = op.work
        for pool in state.pools.values():
            pool.work = op.work
        return op.msg

    def _route_cluster(self, method: str, raw: str, project: str, location: str, cluster: str):
        state = self._lookup(project, location, cluster)
        if method == "GET":
            view = self._cluster_view(state)
            self._tick({state.work, *(p.work for p in state.pools.values())})
            return view
        if method != "DELETE":
            raise self._not_allowed(method)

        def finish() -> None:
            self.clusters.pop((project, location, cluster), None)
            for hook in self.on_cluster_deleted:
                hook(cluster)

        def failed() -> None:
            state.msg.status = gke.Cluster.Status.ERROR

        op = self._start(state, "DELETE_CLUSTER", f"clusters/{cluster}", finish, failed)
        state.msg.status = gke.Cluster.Status.STOPPING
        state.work = op.work
        return op.msg

    def _route_pools(self, method: str, raw: str, project: str, location: str, cluster: str):
        state = self._lookup(project, location, cluster)
        if method == "GET":
            view = gke.ListNodePoolsResponse(node_pools=[gke.NodePool(p.msg) for p in state.pools.values()])
            self._tick({p.work for p in state.pools.values()})
            return view
        if method != "POST":
            raise self._not_allowed(method)
        want = gke.CreateNodePoolRequest.from_json(raw or "{}", ignore_unknown_fields=True).node_pool
        if not want.name:
            raise ApiError(400, "NodePool.name must be specified.")
        if want.name in state.pools:
            raise ApiError(409, f"Already exists: projects/{project}/zones/{location}/clusters/{cluster}/nodePools/{want.name}.")
        seed = SeedPool(
            want.name,
            want.initial_node_count,
            want.autoscaling.min_node_count if want.autoscaling.enabled else None,
            want.autoscaling.max_node_count if want.autoscaling.enabled else None,
            want.config.machine_type or "e2-medium",
            status="PROVISIONING",
        )
        pool = _Pool(self._pool_msg(project, location, cluster, seed), seed.nodes)

        def finish() -> None:
            pool.msg.status = gke.NodePool.Status.RUNNING
            state.msg.status = gke.Cluster.Status.RUNNING

        def failed() -> None:
            pool.msg.status = gke.NodePool.Status.ERROR
            state.msg.status = gke.Cluster.Status.RUNNING

        op = self._start(state, "CREATE_NODE_POOL", f"clusters/{cluster}/nodePools/{want.name}", finish, failed)
        state.pools[want.name] = pool
        state.msg.status = gke.Cluster.Status.RECONCILING
        pool.work = state.work = op.work
        return op.msg

    def _route_pool(self, method: str, raw: str, project: str, location: str, cluster: str, pool: str):
        state = self._lookup(project, location, cluster)
        found = self._pool(state, pool)
        if method == "GET":
            view = gke.NodePool(found.msg)
            self._tick({found.work})
            return view
        if method != "DELETE":
            raise self._not_allowed(method)

        def finish() -> None:
            state.pools.pop(pool, None)
            state.msg.status = gke.Cluster.Status.RUNNING

        def failed() -> None:
            found.msg.status = gke.NodePool.Status.RUNNING
            state.msg.status = gke.Cluster.Status.RUNNING

        op = self._start(state, "DELETE_NODE_POOL", f"clusters/{cluster}/nodePools/{pool}", finish, failed)
        found.msg.status = gke.NodePool.Status.STOPPING
        state.msg.status = gke.Cluster.Status.RECONCILING
        found.work = state.work = op.work
        return op.msg

    def _route_set_size(self, method: str, raw: str, project: str, location: str, cluster: str, pool: str):
        if method != "POST":
            raise self._not_allowed(method)
        state = self._lookup(project, location, cluster)
        found = self._pool(state, pool)
        # proto3 JSON leaves a zero out: {} asks for 0 nodes.
        nodes = gke.SetNodePoolSizeRequest.from_json(raw or "{}", ignore_unknown_fields=True).node_count
        if nodes < 0:
            raise ApiError(400, f"Invalid node count {nodes}: must be non-negative.")

        def finish() -> None:
            found.size = nodes
            found.msg.status = gke.NodePool.Status.RUNNING

        def failed() -> None:
            found.msg.status = gke.NodePool.Status.RUNNING

        op = self._start(state, "SET_NODE_POOL_SIZE", f"clusters/{cluster}/nodePools/{pool}", finish, failed)
        found.msg.status = gke.NodePool.Status.RECONCILING
        found.work = op.work
        return op.msg

    def _route_operation(self, method: str, raw: str, project: str, location: str, operation: str):
        if method != "GET":
            raise self._not_allowed(method)
        op = self.operations.get(operation)
        if not op or op.msg.location != location or f"/projects/{project}/" not in op.msg.self_link:
            raise ApiError(404, f"Not found: operation {operation}.")
        view = gke.Operation(op.msg)
        self._tick({op.work})
        return view

    def _lookup(self, project: str, location: str, name: str) -> _Cluster:
        found = self.clusters.get((project, location, name))
        if not found:
            raise ApiError(404, f"Not found: projects/{project}/zones/{location}/clusters/{name}.")
        return found

    @staticmethod
    def _tick(works: set) -> None:
        # The answer was built first: N polls see the old state, the next one the new.
        for work in works:
            if work is not None:
                work.tick()


def service_account_key(path, token_uri: str, project: str = "olab-test") -> None:
    """A service-account key (as google.auth.default reads one) whose tokens come from ``token_uri``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_text(json.dumps({
        "type": "service_account", "project_id": project, "private_key_id": "k1", "private_key": pem.decode(),
        "client_email": f"olab@{project}.iam.gserviceaccount.com", "client_id": "1", "token_uri": token_uri,
    }))
