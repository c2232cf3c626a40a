"""GKE's API for the gke target: is the cluster terraform made ready, resize a node pool,
a kubeconfig for Helm and kubectl, a short-lived access token.

Plain functions around ``container_v1.ClusterManagerClient`` over REST (no gRPC: one
transport, and the same one Private Service Connect endpoints and tests' fakes serve);
the target wraps them in Prefect tasks. Every call is made with the library's own retry
switched off (``retry=None``) so that one policy, this module's, governs: transient
errors (429, 5xx, a dropped connection) are tried again with bounded exponential backoff;
any other error (403, 404, 400, ...) fails at once with the API's own message on one line,
such as ``GKE API: 403 PERMISSION_DENIED: Required 'container.clusters.get' permission ...``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import google.auth
import google.auth.exceptions
import yaml
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import container_v1
from pydantic import BaseModel, ConfigDict

from core.config import GoogleApis
from core.files import atomic_write
from core.logs import WaitProgress, task_logger
from core.retry import TransientError, call_with_backoff

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
# One HTTP request's own timeout (the waits have theirs).
REQUEST_TIMEOUT = 30.0
MAX_BACKOFF = 30.0
# A wait with nothing new to say still says so this often.
HEARTBEAT = 60.0

T = TypeVar("T")


class GkeError(RuntimeError):
    """GKE refused, failed or took too long; the message is one line saying which."""


class GkeApiError(GkeError):
    """The API answered with an error that trying again will not mend (403, 404, 400, ...)."""

    def __init__(self, message: str, code: int | None = None, status: str = ""):
        super().__init__(message)
        self.code = code
        self.status = status


class GkeUnavailable(GkeError, TransientError):
    """Transient errors (429, 5xx, connection) that outlasted the retries: a task may try again later."""


class GkeTimeout(GkeError):
    """A wait ran out of time (not transient: trying again would wait as long)."""


class ClusterFailed(GkeError):
    """The cluster or a node pool is in a state that waiting will not mend."""


class OperationFailed(GkeError):
    """A GKE operation ended DONE with an error."""


# ---- clients ---------------------------------------------------------------------------


def _credentials():
    try:
        credentials, _project = google.auth.default(scopes=SCOPES)
    except google.auth.exceptions.DefaultCredentialsError as exc:
        first = " ".join(str(exc).split())
        raise GkeError(
            f"no Google credentials: {first} (run `gcloud auth application-default login`, "
            "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key)"
        ) from None
    return credentials


def cluster_manager(apis: GoogleApis) -> container_v1.ClusterManagerClient:
    """GKE's API client over REST: at ``apis.container`` when set (Private Service Connect,
    a test's fake), else Google's; anonymous only where the config allows it (loopback)."""
    credentials = AnonymousCredentials() if apis.anonymous else _credentials()
    options = ClientOptions(api_endpoint=apis.container) if apis.container else None
    return container_v1.ClusterManagerClient(credentials=credentials, transport="rest", client_options=options)


def access_token(apis: GoogleApis) -> str | None:
    """A short-lived (about an hour) OAuth access token of the default credentials, for
    Kubernetes' API; None when the APIs are used anonymously (tests). Never log it."""
    if apis.anonymous:
        return None
    import google.auth.transport.requests

    credentials = _credentials()
    try:
        credentials.refresh(google.auth.transport.requests.Request())
    except google.auth.exceptions.TransportError as exc:
        raise GkeUnavailable(f"Google token endpoint unreachable: {_one_line(str(exc))}") from None
    except google.auth.exceptions.RefreshError as exc:
        raise GkeError(f"Google credentials refused: {_one_line(str(exc))}") from None
    if not credentials.token:
        raise GkeError("Google credentials gave no access token")
    return credentials.token


# ---- names -----------------------------------------------------------------------------


def cluster_path(project: str, location: str, cluster: str) -> str:
    return f"projects/{project}/locations/{location}/clusters/{cluster}"


def pool_path(project: str, location: str, cluster: str, pool: str) -> str:
    return f"{cluster_path(project, location, cluster)}/nodePools/{pool}"


def operation_path(project: str, location: str, operation: str) -> str:
    """An operation's full name; ``operation`` may be its short name (``Operation.name``)."""
    if operation.startswith("projects/"):
        return operation
    return f"projects/{project}/locations/{location}/operations/{operation}"


# ---- the cluster as olab needs it ------------------------------------------------------


class PoolInfo(BaseModel):
    """A node pool. ``node_count`` is the API's ``initialNodeCount``: the size per zone the
    pool was created with. GKE's NodePool carries no current size (setSize and the
    autoscaler do not change it); the cluster's ``current_node_count`` is the live total."""

    model_config = ConfigDict(frozen=True)

    name: str
    status: str
    status_message: str = ""
    machine_type: str = ""
    node_count: int = 0
    autoscaling: bool = False
    # Per-zone bounds (``minNodeCount``/``maxNodeCount``; the ``total*`` bounds when only
    # those are set); None without autoscaling.
    min_nodes: int | None = None
    max_nodes: int | None = None


class ClusterInfo(BaseModel):
    """A cluster, plain fields only. ``ca_certificate`` is base64 of the PEM, as GKE gives it
    (and as a kubeconfig's certificate-authority-data wants it)."""

    model_config = ConfigDict(frozen=True)

    project: str
    name: str
    location: str
    status: str
    status_message: str = ""
    endpoint: str = ""
    ca_certificate: str = ""
    master_version: str = ""
    # GKE's (deprecated but still given) live node count of the whole cluster.
    current_node_count: int = 0
    pools: list[PoolInfo] = []

    def pool(self, name: str) -> PoolInfo | None:
        return next((p for p in self.pools if p.name == name), None)

    @property
    def context_name(self) -> str:
        """The name gcloud gives this cluster in a kubeconfig."""
        return f"gke_{self.project}_{self.location}_{self.name}"


def _enum_name(value: object) -> str:
    # An enum value newer than this library arrives as a bare number.
    return getattr(value, "name", None) or str(value)


def _problem(status_message: str, conditions) -> str:
    messages = [c.message for c in conditions if c.message]
    return _one_line("; ".join(messages) or status_message)


def pool_info(pool: container_v1.NodePool) -> PoolInfo:
    scaling = pool.autoscaling
    on = bool(scaling.enabled)
    low = scaling.min_node_count or scaling.total_min_node_count
    high = scaling.max_node_count or scaling.total_max_node_count
    return PoolInfo(
        name=pool.name,
        status=_enum_name(pool.status),
        status_message=_problem(pool.status_message, pool.conditions),
        machine_type=pool.config.machine_type,
        node_count=pool.initial_node_count,
        autoscaling=on,
        min_nodes=low if on else None,
        max_nodes=high if on else None,
    )


def cluster_info(cluster: container_v1.Cluster, project: str) -> ClusterInfo:
    """The plain facts olab uses from GKE's Cluster message."""
    return ClusterInfo(
        project=project,
        name=cluster.name,
        location=cluster.location or cluster.zone,
        status=_enum_name(cluster.status),
        status_message=_problem(cluster.status_message, cluster.conditions),
        endpoint=cluster.endpoint,
        ca_certificate=cluster.master_auth.cluster_ca_certificate,
        master_version=cluster.current_master_version,
        current_node_count=cluster.current_node_count,
        pools=[pool_info(p) for p in cluster.node_pools],
    )


def summary(info: ClusterInfo, pools: list[str]) -> str:
    """``cluster olab: PROVISIONING; pools core RUNNING, user PROVISIONING``."""
    line = f"cluster {info.name}: {info.status}"
    if pools:
        states = [f"{name} {p.status if (p := info.pool(name)) else 'absent'}" for name in pools]
        line += "; pools " + ", ".join(states)
    return line


def readiness(info: ClusterInfo, pools: list[str]) -> bool:
    """True when the cluster and every named pool run; False while they may still get
    there; ClusterFailed when they will not without someone's help."""
    where = f"cluster {info.name}"
    why = f": {info.status_message}" if info.status_message else ""
    if info.status in ("ERROR", "DEGRADED"):
        raise ClusterFailed(f"{where} is {info.status}{why}")
    if info.status == "STOPPING":
        raise ClusterFailed(f"{where} is STOPPING (being deleted){why}")
    ready = info.status == "RUNNING"
    for name in pools:
        pool = info.pool(name)
        if pool is None:
            # While the cluster provisions or reconciles, a pool may be on its way; a running
            # cluster adds none by itself.
            if info.status == "RUNNING":
                have = ", ".join(p.name for p in info.pools) or "none"
                raise ClusterFailed(f"{where} has no node pool {name} (pools: {have})")
            ready = False
            continue
        pool_why = f": {pool.status_message}" if pool.status_message else ""
        if pool.status in ("ERROR", "STOPPING"):
            raise ClusterFailed(f"{where}: node pool {name} is {pool.status}{pool_why}")
        # RUNNING_WITH_ERROR: the pool works, some nodes did not come (a stockout, quota);
        # usable, and reported by the caller.
        ready = ready and pool.status in ("RUNNING", "RUNNING_WITH_ERROR")
    return ready


# ---- calls and retries -----------------------------------------------------------------


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if value >= 10 else f"{value:.1f}s"


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error_parts(exc: api_exceptions.GoogleAPICallError) -> tuple[int | None, str, str]:
    """(HTTP code, Google status name, message) of an API error, from its JSON body when it
    has one: the REST transport puts "METHOD URL: " before the message and, for HTTP
    errors, sets no gRPC status (a 403 is Forbidden with grpc_status_code None)."""
    code = int(exc.code) if isinstance(exc.code, int) else None
    status = getattr(exc.grpc_status_code, "name", "") or ""
    message = exc.message or ""
    response = getattr(exc, "response", None)
    try:
        error = response.json().get("error", {}) if response is not None else {}
    except (ValueError, AttributeError):
        error = {}
    if isinstance(error, dict):
        status = error.get("status") or status
        message = error.get("message") or message
    return code, status, _one_line(message)


def api_message(exc: BaseException) -> str:
    """An API error as one line, in the API's own words:
    ``GKE API: 403 PERMISSION_DENIED: Required 'container.clusters.get' permission ...``."""
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        code, status, message = _error_parts(exc)
        head = " ".join(str(part) for part in (code, status) if part)
        return f"GKE API: {head}: {message}" if head else f"GKE API: {message}"
    return f"GKE API unreachable: {type(exc).__name__}: {_one_line(str(exc))}"


_TRANSIENT = (
    api_exceptions.TooManyRequests,
    api_exceptions.ServiceUnavailable,
    api_exceptions.InternalServerError,
    api_exceptions.BadGateway,
    api_exceptions.GatewayTimeout,
    api_exceptions.DeadlineExceeded,
)


def is_transient_api_error(exc: BaseException) -> bool:
    """429 and 5xx, and a connection that failed (requests' errors are OSErrors)."""
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return isinstance(exc.code, int) and exc.code >= 500
    return isinstance(exc, (google.auth.exceptions.TransportError, OSError))


def _permanent(exc: BaseException) -> BaseException:
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        code, status, _ = _error_parts(exc)
        return GkeApiError(api_message(exc), code, status)
    return exc


def _call(what: str, fn: Callable[[], T], deadline: float, retries: int, backoff: float) -> T:
    """One API call, tried again on transient errors (core.retry.call_with_backoff)."""
    return call_with_backoff(
        what, fn, deadline=deadline, retries=retries, backoff=backoff, max_backoff=MAX_BACKOFF,
        transient=is_transient_api_error, describe=api_message, permanent=_permanent, unavailable=GkeUnavailable,
    )


# ---- waits -----------------------------------------------------------------------------


def get_cluster(
    client: container_v1.ClusterManagerClient,
    project: str,
    location: str,
    cluster: str,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    deadline: float | None = None,
) -> ClusterInfo:
    name = cluster_path(project, location, cluster)
    found = _call(
        f"get cluster {cluster}",
        lambda: client.get_cluster(name=name, retry=None, timeout=REQUEST_TIMEOUT),
        deadline if deadline is not None else time.monotonic() + 600,
        retries,
        backoff,
    )
    return cluster_info(found, project)


def wait_until_ready(
    client: container_v1.ClusterManagerClient,
    project: str,
    location: str,
    cluster: str,
    pools: list[str],
    timeout: float,
    poll: float,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    log_every: float = 5.0,
) -> ClusterInfo:
    """Poll the cluster until it and every pool in ``pools`` are RUNNING; its facts then.

    Raises ClusterFailed at once on ERROR/DEGRADED/STOPPING (with GKE's message), GkeTimeout
    after ``timeout`` seconds, GkeApiError on a permanent API error, GkeUnavailable when
    transient errors outlast ``retries``.
    """
    deadline = time.monotonic() + timeout
    progress = WaitProgress(log_every, HEARTBEAT)
    while True:
        info = get_cluster(client, project, location, cluster, retries=retries, backoff=backoff, deadline=deadline)
        line = summary(info, pools)
        if readiness(info, pools):
            progress(line, final=True)
            for name in pools:
                pool = info.pool(name)
                if pool and pool.status == "RUNNING_WITH_ERROR":
                    task_logger().warning(
                        "cluster %s: node pool %s is RUNNING_WITH_ERROR: %s", cluster, name, pool.status_message or "no message"
                    )
            return info
        progress(line)
        left = deadline - time.monotonic()
        if left <= 0:
            raise GkeTimeout(f"{line}: not ready after {_seconds(timeout)}")
        time.sleep(min(poll, left))


def wait_for_operation(
    client: container_v1.ClusterManagerClient,
    project: str,
    location: str,
    operation_name: str,
    timeout: float,
    poll: float,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    log_every: float = 5.0,
) -> container_v1.Operation:
    """Poll an operation until DONE; the done operation, or OperationFailed with its error
    message, GkeTimeout after ``timeout`` seconds."""
    name = operation_path(project, location, operation_name)
    short = name.rsplit("/", 1)[-1]
    deadline = time.monotonic() + timeout
    progress = WaitProgress(log_every, HEARTBEAT)
    while True:
        op = _call(
            f"get operation {short}",
            lambda: client.get_operation(name=name, retry=None, timeout=REQUEST_TIMEOUT),
            deadline,
            retries,
            backoff,
        )
        status = _enum_name(op.status)
        target = op.target_link.split("/v1/", 1)[-1] if op.target_link else ""
        line = " ".join(part for part in ("operation", short, _enum_name(op.operation_type), target) if part)
        line += f": {status}"
        if status == "DONE":
            if op.error.message or op.error.code:
                raise OperationFailed(f"{line} with error: {_one_line(op.error.message or f'code {op.error.code}')}")
            if op.status_message:
                # Deprecated, but older operations report failure only there.
                raise OperationFailed(f"{line} with error: {_one_line(op.status_message)}")
            progress(line, final=True)
            return op
        progress(line)
        left = deadline - time.monotonic()
        if left <= 0:
            raise GkeTimeout(f"{line}: not done after {_seconds(timeout)}")
        time.sleep(min(poll, left))


def set_pool_size(
    client: container_v1.ClusterManagerClient,
    project: str,
    location: str,
    cluster: str,
    pool: str,
    nodes: int,
    timeout: float,
    poll: float,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    log_every: float = 5.0,
) -> container_v1.Operation:
    """Resize a node pool (per zone, as GKE counts) and wait for GKE's operation; the done
    operation. Setting a size is idempotent, so a transient error is tried again; if the
    lost attempt did start an operation, the retry meets 400 FAILED_PRECONDITION."""
    if nodes < 0:
        raise ValueError(f"node pool {pool}: {nodes} nodes")
    deadline = time.monotonic() + timeout
    request = container_v1.SetNodePoolSizeRequest(name=pool_path(project, location, cluster, pool), node_count=nodes)
    op = _call(
        f"resize node pool {pool}",
        lambda: client.set_node_pool_size(request=request, retry=None, timeout=REQUEST_TIMEOUT),
        deadline,
        retries,
        backoff,
    )
    task_logger().info("cluster %s: node pool %s to %d node(s) (operation %s)", cluster, pool, nodes, op.name)
    return wait_for_operation(
        client, project, location, op.name, max(deadline - time.monotonic(), 0.0), poll,
        retries=retries, backoff=backoff, log_every=log_every,
    )


# ---- kubeconfig ------------------------------------------------------------------------


def kubeconfig_document(info: ClusterInfo, token: str, namespace: str | None = None) -> dict:
    """A kubeconfig for the cluster's public endpoint with a bearer token (which expires:
    access tokens last about an hour, so write one per run)."""
    if not info.endpoint or not info.ca_certificate:
        raise GkeError(f"cluster {info.name} ({info.status}): no endpoint or CA certificate yet")
    if not token:
        raise GkeError(f"cluster {info.name}: no access token for the kubeconfig")
    name = info.context_name
    context: dict = {"cluster": name, "user": name}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": f"https://{info.endpoint}", "certificate-authority-data": info.ca_certificate}}
        ],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": context}],
        "current-context": name,
        "preferences": {},
    }


def write_kubeconfig(path: Path, info: ClusterInfo, token: str, namespace: str | None = None) -> Path:
    """Write the kubeconfig atomically, private (0600) from its first byte; the path."""
    path = Path(path)
    text = yaml.safe_dump(kubeconfig_document(info, token, namespace), sort_keys=False)
    atomic_write(path, text, mode=0o600)
    task_logger().info("kubeconfig for cluster %s (https://%s) written to %s", info.name, info.endpoint, path)
    return path


def refresh_kubeconfig_token(path: Path, token: str) -> Path:
    """Put a fresh token into a kubeconfig this module wrote (still 0600, written whole)."""
    document = yaml.safe_load(Path(path).read_text())
    for user in document.get("users", []):
        user.setdefault("user", {})["token"] = token
    atomic_write(Path(path), yaml.safe_dump(document, sort_keys=False), mode=0o600)
    return Path(path)
