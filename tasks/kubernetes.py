"""Kubernetes' API for the gke target: what a failed deploy left (pods that do not come up
and why, a Helm release stuck mid-upgrade) and which disks hold the students' work (the
claims of Zero-to-JupyterHub, for the weekend shutdown).

Plain functions around the official ``kubernetes`` client, read-only, given an
``ApiClient`` made by :func:`api_from_kubeconfig` from the kubeconfig
``tasks.gke.write_kubeconfig`` writes (its own ``Configuration``, never the process-wide
default). The client's own retries are off (urllib3's ``retries=False``) so that one
policy, this module's, governs, as in tasks/gke.py: transient errors (429, 5xx, a dropped
or refused connection) are tried again with bounded exponential backoff; any other error
(403, 404, 400, ...) fails at once as one line with the API's own message, such as
``Kubernetes API: 403 Forbidden: secrets is forbidden: User "..." cannot list resource
"secrets" in API group "" in the namespace "olab": ...``.

- :func:`api_from_kubeconfig`: an ``ApiClient`` (close it, or use it in ``with``)
- :func:`failing_pods` -> :class:`PodProblem`; :func:`pod_events`: one line per event
- :func:`helm_releases` -> :class:`HelmRevision` (Helm 3 and 4 release secrets decoded),
  :func:`helm_revision` (one); :func:`stuck_release`: the pending revision that blocks the
  next ``helm upgrade``
- :func:`user_claims` -> :class:`ClaimBinding`: claim -> volume -> GCE disk
"""

from __future__ import annotations

import base64
import binascii
import datetime
import gzip
import json
import re
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from pydantic import BaseModel, ConfigDict

from core.logs import task_logger
from core.retry import TransientError, call_with_backoff

# One HTTP request's own timeout.
REQUEST_TIMEOUT = 30.0
MAX_BACKOFF = 30.0
HELM_SECRET_TYPE = "helm.sh/release.v1"
PENDING_STATUSES = ("pending-install", "pending-upgrade", "pending-rollback")
# Zero-to-JupyterHub's names: the hub's sqlite disk, and olab's pvcNameTemplate
# (helm/values/base.yaml: claim-{username}).
HUB_CLAIM = "hub-db-dir"
USER_CLAIM_PREFIX = "claim-"
# Waiting reasons that are a container on its way, not a problem.
_STARTING = {"ContainerCreating", "PodInitializing"}

T = TypeVar("T")


class KubernetesError(RuntimeError):
    """Kubernetes refused or failed; the message is one line saying which."""


class KubernetesApiError(KubernetesError):
    """The API answered with an error that trying again will not mend (403, 404, 400, ...):
    ``code`` is the HTTP status, ``reason`` the Status' reason (Forbidden, NotFound, ...)."""

    def __init__(self, message: str, code: int | None = None, reason: str = ""):
        super().__init__(message)
        self.code = code
        self.reason = reason


class KubernetesUnavailable(KubernetesError, TransientError):
    """Transient errors (429, 5xx, connection) that outlasted the retries: a task may try again later."""


# ---- the client ------------------------------------------------------------------------


class _ApiClient(k8s.ApiClient):
    """An ApiClient whose ``close`` also closes its pooled connections."""

    def close(self) -> None:
        super().close()
        self.rest_client.pool_manager.clear()


def api_from_kubeconfig(path: Path | str, context: str | None = None) -> k8s.ApiClient:
    """An API client for the kubeconfig at ``path`` (its current context, or ``context``),
    in a private Configuration: the process-wide default is left alone. Close it when done
    (``with api_from_kubeconfig(p) as api: ...``)."""
    path = Path(path)
    if not path.is_file():
        raise KubernetesError(f"kubeconfig {path}: not found")
    configuration = k8s.Configuration()
    try:
        k8s_config.load_kube_config(
            config_file=str(path),
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
    except (ConfigException, yaml.YAMLError, OSError, ValueError, TypeError, KeyError) as exc:
        raise KubernetesError(f"kubeconfig {path}: {_one_line(str(exc)) or type(exc).__name__}") from None
    # One retry policy, this module's (urllib3 would otherwise try three more times at once).
    configuration.retries = False
    return _ApiClient(configuration)


# ---- errors and retries ----------------------------------------------------------------


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error_parts(exc: ApiException) -> tuple[int | None, str, str]:
    """(HTTP status, Status reason, message) of an API error, from its V1Status body when it
    has one (the API server's own words), else the HTTP reason and the body's text."""
    code = exc.status if isinstance(exc.status, int) and exc.status else None
    reason = str(exc.reason or "").strip()
    body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else (exc.body or "")
    message = ""
    try:
        status = json.loads(body) if body else {}
    except ValueError:
        status = {}
    if isinstance(status, dict) and status.get("kind") == "Status":
        reason = status.get("reason") or reason
        message = status.get("message") or ""
    elif body:
        message = body
    return code, _one_line(reason), _one_line(message)


def api_message(exc: BaseException) -> str:
    """An API error as one line, in the API's own words:
    ``Kubernetes API: 404 NotFound: pods "hub-0" not found``."""
    if isinstance(exc, ApiException):
        code, reason, message = _error_parts(exc)
        if code is None:
            # status 0: the client's own failure before any answer (TLS, mostly).
            return f"Kubernetes API: {reason or 'request failed'}"
        head = f"{code} {reason}".strip()
        return f"Kubernetes API: {head}: {message}" if message else f"Kubernetes API: {head}"
    return f"Kubernetes API unreachable: {type(exc).__name__}: {_one_line(str(exc))}"


def is_transient_api_error(exc: BaseException) -> bool:
    """429 and 5xx; a connection refused, dropped or timed out (the client's transport,
    urllib3, raises its own errors, which are not OSErrors: told by their module)."""
    if isinstance(exc, ApiException):
        return isinstance(exc.status, int) and (exc.status == 429 or exc.status >= 500)
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    return type(exc).__module__.split(".")[0] == "urllib3"


def _unwrap(exc: BaseException) -> BaseException:
    """The client's own error under an AttributeError: for a request that got no answer
    (TLS refused, status 0) the client's ApiClient decodes the missing body (None) and
    raises AttributeError while handling the ApiException that says what went wrong."""
    if isinstance(exc, AttributeError) and isinstance(exc.__context__, ApiException):
        return exc.__context__
    return exc


def _permanent(what: str):
    def make(exc: BaseException) -> BaseException:
        if isinstance(exc, ApiException):
            code, reason, _ = _error_parts(exc)
            return KubernetesApiError(f"{api_message(exc)} ({what})", code, reason)
        if isinstance(exc, ValueError):
            # The client could not read the answer into its models.
            return KubernetesError(f"{what}: unreadable answer: {_one_line(str(exc))}")
        return exc

    return make


def _call(what: str, fn: Callable[[], T], deadline: float, retries: int, backoff: float) -> T:
    """One API call, tried again on transient errors (core.retry.call_with_backoff)."""
    return call_with_backoff(
        what, fn, deadline=deadline, retries=retries, backoff=backoff, max_backoff=MAX_BACKOFF,
        transient=is_transient_api_error, describe=api_message, permanent=_permanent(what),
        unavailable=KubernetesUnavailable, unwrap=_unwrap,
    )


def _request(
    what: str, fn: Callable[..., T], *args: Any, retries: int, backoff: float, deadline: float | None, **kwargs: Any
) -> T:
    kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
    return _call(
        what,
        lambda: fn(*args, **kwargs),
        deadline if deadline is not None else time.monotonic() + 600,
        retries,
        backoff,
    )


# ---- pods ------------------------------------------------------------------------------


class PodProblem(BaseModel):
    """Why a pod is not up: ``reason`` is the container's (ImagePullBackOff,
    CrashLoopBackOff, OOMKilled, ...) or the pod's (Unschedulable, Evicted, ...)."""

    model_config = ConfigDict(frozen=True)

    pod: str
    phase: str
    reason: str
    message: str = ""
    container: str | None = None
    restarts: int = 0
    node: str | None = None

    @property
    def line(self) -> str:
        where = f" (container {self.container})" if self.container else ""
        restarts = f", {self.restarts} restarts" if self.restarts else ""
        text = f"pod {self.pod}: {self.phase}, {self.reason}{where}{restarts}"
        return f"{text}: {self.message}" if self.message else text

    def __str__(self) -> str:
        return self.line


def _last_exit(status: k8s.V1ContainerStatus) -> str:
    last = status.last_state.terminated if status.last_state else None
    if not last:
        return ""
    return f"last exit: {last.reason or 'Error'} (exit code {last.exit_code})"


def _container_problem(pod: k8s.V1Pod, status: k8s.V1ContainerStatus, init: bool) -> PodProblem | None:
    state = status.state
    phase = pod.status.phase or "Unknown"
    kind = "init container " if init else ""
    common = {"pod": pod.metadata.name, "phase": phase, "container": f"{kind}{status.name}",
              "restarts": status.restart_count or 0, "node": pod.spec.node_name if pod.spec else None}
    if state and state.waiting and state.waiting.reason and state.waiting.reason not in _STARTING:
        message = "; ".join(part for part in (_one_line(state.waiting.message or ""), _last_exit(status)) if part)
        return PodProblem(reason=state.waiting.reason, message=message, **common)
    if state and state.terminated and state.terminated.exit_code:
        t = state.terminated
        message = _one_line(t.message or "") or f"exit code {t.exit_code}"
        return PodProblem(reason=t.reason or "Error", message=message, **common)
    return None


def pod_problem(pod: k8s.V1Pod) -> PodProblem | None:
    """What keeps a pod from running, or None (running, succeeded, or on its way). Pure."""
    status = pod.status or k8s.V1PodStatus()
    phase = status.phase or "Unknown"
    name = pod.metadata.name
    node = pod.spec.node_name if pod.spec else None
    if phase == "Succeeded":
        return None
    if phase in ("Failed", "Unknown") and status.reason:
        # The pod's own reason (Evicted, NodeLost, ...) tells more than its containers'.
        return PodProblem(pod=name, phase=phase, reason=status.reason, message=_one_line(status.message or ""), node=node)
    for init, statuses in ((True, status.init_container_statuses), (False, status.container_statuses)):
        for container in statuses or []:
            if found := _container_problem(pod, container, init):
                return found
    for condition in status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return PodProblem(
                pod=name, phase=phase, reason=condition.reason or "Unschedulable", message=_one_line(condition.message or "")
            )
    if phase in ("Failed", "Unknown"):
        return PodProblem(pod=name, phase=phase, reason=phase, message=_one_line(status.message or ""), node=node)
    return None


def failing_pods(
    api: k8s.ApiClient,
    namespace: str,
    selector: str | None = None,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    deadline: float | None = None,
) -> list[PodProblem]:
    """The pods in ``namespace`` (matching the label ``selector``, if given) that are not
    coming up, one problem each, sorted by pod name."""
    core = k8s.CoreV1Api(api)
    kwargs: dict[str, Any] = {"field_selector": "status.phase!=Succeeded"}
    if selector:
        kwargs["label_selector"] = selector
    pods = _request(
        f"list pods in {namespace}", core.list_namespaced_pod, namespace,
        retries=retries, backoff=backoff, deadline=deadline, **kwargs,
    )
    problems = [p for pod in pods.items if pod.metadata and not pod.metadata.deletion_timestamp and (p := pod_problem(pod))]
    return sorted(problems, key=lambda p: p.pod)


def _event_time(event: k8s.CoreV1Event) -> datetime.datetime:
    for when in (event.last_timestamp, event.event_time, event.first_timestamp, event.metadata.creation_timestamp):
        if when is not None:
            return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)
    return datetime.datetime.min.replace(tzinfo=datetime.UTC)


def event_line(event: k8s.CoreV1Event) -> str:
    """``Warning Failed: Failed to pull image "..." (x4)``. Pure."""
    count = event.series.count if event.series and event.series.count else event.count
    times = f" (x{count})" if count and count > 1 else ""
    return f"{event.type or 'Normal'} {event.reason or 'Unknown'}: {_one_line(event.message or '')}{times}"


def pod_events(
    api: k8s.ApiClient,
    namespace: str,
    pod: str,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    deadline: float | None = None,
) -> list[str]:
    """The events about a pod, oldest first, one line each (type, reason, message)."""
    core = k8s.CoreV1Api(api)
    events = _request(
        f"list events of pod {pod}", core.list_namespaced_event, namespace,
        field_selector=f"involvedObject.kind=Pod,involvedObject.name={pod}",
        retries=retries, backoff=backoff, deadline=deadline,
    )
    return [event_line(e) for e in sorted(events.items, key=_event_time)]


def pod_report(api: k8s.ApiClient, namespace: str, pod: str, *, events: int = 5) -> list[str]:
    """One pod for a failure report: its problem (if it has one, or that it is missing) and
    its last events."""
    lines = []
    try:
        found = _request(f"read pod {pod}", k8s.CoreV1Api(api).read_namespaced_pod, pod, namespace,
                         retries=2, backoff=0.5, deadline=None)
        if problem := pod_problem(found):
            lines.append(f"pod {pod}: {problem.phase} {problem.reason} {problem.message}".rstrip())
    except KubernetesApiError as exc:
        lines.append(f"pod {pod}: {exc}")
    return lines + pod_events(api, namespace, pod)[-events:]


# ---- Helm's release secrets ------------------------------------------------------------


class HelmRevision(BaseModel):
    """One revision of a Helm release, from its secret (Helm 3 and 4 store the same way)."""

    model_config = ConfigDict(frozen=True)

    release: str
    namespace: str
    revision: int
    status: str
    chart: str = ""
    chart_version: str = ""
    app_version: str = ""
    # The values given to this revision (``helm get values``), not the chart's defaults.
    values: dict[str, Any] = {}
    description: str = ""
    first_deployed: datetime.datetime | None = None
    updated: datetime.datetime | None = None
    secret: str = ""

    @property
    def pending(self) -> bool:
        return self.status in PENDING_STATUSES


def _helm_time(value: Any) -> datetime.datetime | None:
    # Go's RFC 3339 with up to nanoseconds; Helm 3 writes a zero time as "".
    if not value or not isinstance(value, str):
        return None
    text = re.sub(r"(\.\d{6})\d+", r"\1", value.replace("Z", "+00:00"))
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        return None


def decode_release(data: str) -> dict:
    """Helm's ``decodeRelease``: ``data`` is the stored text (base64 of gzip of the JSON, or
    of the JSON itself for releases stored before compression); the release as a dict."""
    raw = base64.b64decode(data, validate=True)
    if raw[:3] == b"\x1f\x8b\x08":
        raw = gzip.decompress(raw)
    release = json.loads(raw)
    if not isinstance(release, dict):
        raise ValueError("not a release object")
    return release


def revision_from_secret(secret: k8s.V1Secret) -> HelmRevision:
    """A release secret as a HelmRevision; KubernetesError when it does not decode. Pure."""
    name = secret.metadata.name
    stored = (secret.data or {}).get("release")
    if not stored:
        raise KubernetesError(f"helm release secret {name}: no release data")
    try:
        # The Secret's data is base64 on the wire (the client leaves it so); inside is Helm's text.
        release = decode_release(base64.b64decode(stored, validate=True).decode("ascii"))
    except (binascii.Error, UnicodeDecodeError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise KubernetesError(f"helm release secret {name}: cannot decode: {_one_line(str(exc))}") from None
    labels = secret.metadata.labels or {}
    info = release.get("info") or {}
    metadata = (release.get("chart") or {}).get("metadata") or {}
    version = release.get("version") or labels.get("version") or 0
    return HelmRevision(
        release=release.get("name") or labels.get("name", ""),
        namespace=release.get("namespace") or secret.metadata.namespace or "",
        revision=int(version),
        status=info.get("status") or labels.get("status", "unknown"),
        chart=metadata.get("name", ""),
        chart_version=metadata.get("version", ""),
        app_version=metadata.get("appVersion", ""),
        values=release.get("config") or {},
        description=info.get("description", ""),
        first_deployed=_helm_time(info.get("first_deployed")),
        updated=_helm_time(info.get("last_deployed")),
        secret=name,
    )


def helm_releases(
    api: k8s.ApiClient,
    namespace: str,
    release: str,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    deadline: float | None = None,
) -> list[HelmRevision]:
    """Every stored revision of ``release`` in ``namespace``, oldest first (empty when Helm
    never installed it there)."""
    core = k8s.CoreV1Api(api)
    secrets = _request(
        f"list helm release secrets of {release}", core.list_namespaced_secret, namespace,
        label_selector=f"owner=helm,name={release}",
        retries=retries, backoff=backoff, deadline=deadline,
    )
    revisions = [revision_from_secret(s) for s in secrets.items if s.type == HELM_SECRET_TYPE]
    return sorted(revisions, key=lambda r: r.revision)


def helm_release_secret_name(release: str, revision: int) -> str:
    """Helm's key for a revision: ``sh.helm.release.v1.<release>.v<revision>``."""
    return f"sh.helm.release.v1.{release}.v{revision}"


def helm_revision(
    api: k8s.ApiClient,
    namespace: str,
    release: str,
    revision: int,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    deadline: float | None = None,
) -> HelmRevision:
    """One revision of ``release`` (its values, to go back to, say); KubernetesApiError 404
    when Helm keeps no such revision (``helm upgrade`` prunes beyond ``--history-max``)."""
    core = k8s.CoreV1Api(api)
    secret = _request(
        f"read revision {revision} of helm release {release}", core.read_namespaced_secret,
        helm_release_secret_name(release, revision), namespace,
        retries=retries, backoff=backoff, deadline=deadline,
    )
    return revision_from_secret(secret)


def stuck_release(revisions: list[HelmRevision]) -> HelmRevision | None:
    """The revision that blocks the next ``helm upgrade`` ("another operation
    (install/upgrade/rollback) is in progress"): the newest revision, when it is
    pending-install, pending-upgrade or pending-rollback. Helm looks at the newest only
    (``Releases.Last``), so an older pending revision under a newer one blocks nothing. Pure."""
    if not revisions:
        return None
    newest = max(revisions, key=lambda r: r.revision)
    return newest if newest.pending else None


# ---- claims and disks ------------------------------------------------------------------


class GceDisk(BaseModel):
    """A Compute Engine persistent disk; ``location`` is a zone (or a region, ``regional``).
    ``project`` is None for an in-tree volume, which names only the disk."""

    model_config = ConfigDict(frozen=True)

    name: str
    location: str = ""
    project: str | None = None
    regional: bool = False

    @property
    def path(self) -> str:
        scope = "regions" if self.regional else "zones"
        return f"projects/{self.project or '-'}/{scope}/{self.location or '-'}/disks/{self.name}"


class ClaimBinding(BaseModel):
    """A claim of Zero-to-JupyterHub's and what holds it: claim -> volume -> disk."""

    model_config = ConfigDict(frozen=True)

    claim: str
    namespace: str
    kind: Literal["user", "hub"]
    # The JupyterHub user (KubeSpawner's annotation, else the claim's name less "claim-").
    username: str | None = None
    phase: str = ""
    volume: str | None = None
    volume_phase: str | None = None
    disk: GceDisk | None = None
    size: str = ""
    storage_class: str | None = None
    reclaim_policy: str | None = None
    access_modes: list[str] = []
    labels: dict[str, str] = {}


_HANDLE = re.compile(r"projects/(?P<project>[^/]+)/(?P<scope>zones|regions)/(?P<location>[^/]+)/disks/(?P<name>[^/]+)")
_ZONE_KEYS = ("topology.gke.io/zone", "topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")


def volume_disk(pv: k8s.V1PersistentVolume) -> GceDisk | None:
    """The GCE disk under a volume: the PD CSI driver's ``volumeHandle``
    (``projects/P/zones/Z/disks/D``), or the in-tree ``gcePersistentDisk.pdName`` with its
    zone from the volume's labels or node affinity. Pure."""
    spec = pv.spec
    if spec is None:
        return None
    if spec.csi and spec.csi.volume_handle:
        m = _HANDLE.fullmatch(spec.csi.volume_handle)
        if m:
            return GceDisk(
                name=m["name"], location=m["location"], project=m["project"], regional=m["scope"] == "regions"
            )
        return None
    if spec.gce_persistent_disk and spec.gce_persistent_disk.pd_name:
        labels = pv.metadata.labels or {}
        zone = next((labels[k] for k in _ZONE_KEYS if labels.get(k)), "")
        if not zone and spec.node_affinity and spec.node_affinity.required:
            for term in spec.node_affinity.required.node_selector_terms or []:
                for req in term.match_expressions or []:
                    if req.key in _ZONE_KEYS and req.values:
                        zone = req.values[0]
        return GceDisk(name=spec.gce_persistent_disk.pd_name, location=zone)
    return None


def claim_binding(
    pvc: k8s.V1PersistentVolumeClaim, pv: k8s.V1PersistentVolume | None, kind: Literal["user", "hub"]
) -> ClaimBinding:
    """Pure."""
    meta, spec, status = pvc.metadata, pvc.spec, pvc.status
    username = None
    if kind == "user":
        username = (meta.annotations or {}).get("hub.jupyter.org/username") or meta.name.removeprefix(USER_CLAIM_PREFIX)
    if pv is not None and pv.spec and pv.spec.capacity:
        size = pv.spec.capacity.get("storage", "")
    elif status and status.capacity:
        size = status.capacity.get("storage", "")
    else:
        size = ((spec.resources.requests if spec and spec.resources else None) or {}).get("storage", "")
    return ClaimBinding(
        claim=meta.name,
        namespace=meta.namespace or "",
        kind=kind,
        username=username,
        phase=(status.phase if status else None) or "",
        volume=(spec.volume_name if spec else None) or None,
        volume_phase=pv.status.phase if pv is not None and pv.status else None,
        disk=volume_disk(pv) if pv is not None else None,
        size=size,
        storage_class=(spec.storage_class_name if spec else None) or (pv.spec.storage_class_name if pv is not None else None),
        reclaim_policy=pv.spec.persistent_volume_reclaim_policy if pv is not None else None,
        access_modes=list((spec.access_modes if spec else None) or []),
        labels=dict(meta.labels or {}),
    )


def user_claims(
    api: k8s.ApiClient,
    namespace: str,
    *,
    hub_claim: str = HUB_CLAIM,
    prefix: str = USER_CLAIM_PREFIX,
    retries: int = 5,
    backoff: float = 1.0,
    deadline: float | None = None,
) -> list[ClaimBinding]:
    """The hub's claim and every user's (``claim-<username>``, or labelled
    ``component=singleuser-storage`` by KubeSpawner) in ``namespace``, each with its volume
    and disk: the hub's first, then users' by claim name. Two requests: the claims, and the
    (cluster-scoped) volumes."""
    core = k8s.CoreV1Api(api)
    claims = _request(
        f"list persistent volume claims in {namespace}", core.list_namespaced_persistent_volume_claim, namespace,
        retries=retries, backoff=backoff, deadline=deadline,
    )
    wanted: list[tuple[k8s.V1PersistentVolumeClaim, Literal["user", "hub"]]] = []
    for pvc in claims.items:
        name = pvc.metadata.name
        if name == hub_claim:
            wanted.append((pvc, "hub"))
        elif name.startswith(prefix) or (pvc.metadata.labels or {}).get("component") == "singleuser-storage":
            wanted.append((pvc, "user"))
    if not wanted:
        return []
    volumes = _request(
        "list persistent volumes", core.list_persistent_volume,
        retries=retries, backoff=backoff, deadline=deadline,
    )
    by_name = {pv.metadata.name: pv for pv in volumes.items}
    found = [claim_binding(pvc, by_name.get(pvc.spec.volume_name) if pvc.spec else None, kind) for pvc, kind in wanted]
    return sorted(found, key=lambda c: (c.kind != "hub", c.claim))


# ---- claims on restored disks (the weekend shutdown's destroy mode) --------------------

PD_CSI_DRIVER = "pd.csi.storage.gke.io"
ZONE_KEY = "topology.gke.io/zone"
USERNAME_ANNOTATION = "hub.jupyter.org/username"


class RestoredClaim(BaseModel):
    """A claim to bind again, statically, to a disk made from its snapshot: the volume
    (``Retain``, so that deleting the claim never deletes the disk) and the claim of the
    same name as before. ``helm_release`` (the hub's claim): the claim carries Helm's
    ownership marks, so that the chart, installed after it, adopts it instead of
    refusing to overwrite it."""

    model_config = ConfigDict(frozen=True)

    claim: str
    namespace: str
    volume: str
    disk: GceDisk
    size: str
    storage_class: str | None = None
    access_modes: list[str] = ["ReadWriteOnce"]
    labels: dict[str, str] = {}
    username: str | None = None
    helm_release: str | None = None


def persistent_volume(want: RestoredClaim) -> k8s.V1PersistentVolume:
    """The volume for a restored disk, pre-bound to its claim (pure)."""
    return k8s.V1PersistentVolume(
        api_version="v1",
        kind="PersistentVolume",
        metadata=k8s.V1ObjectMeta(name=want.volume, labels={"olab.restored": "true"}),
        spec=k8s.V1PersistentVolumeSpec(
            access_modes=list(want.access_modes),
            capacity={"storage": want.size},
            claim_ref=k8s.V1ObjectReference(
                api_version="v1", kind="PersistentVolumeClaim", namespace=want.namespace, name=want.claim
            ),
            persistent_volume_reclaim_policy="Retain",
            storage_class_name=want.storage_class,
            volume_mode="Filesystem",
            csi=k8s.V1CSIPersistentVolumeSource(driver=PD_CSI_DRIVER, fs_type="ext4", volume_handle=want.disk.path),
            node_affinity=k8s.V1VolumeNodeAffinity(
                required=k8s.V1NodeSelector(
                    node_selector_terms=[
                        k8s.V1NodeSelectorTerm(
                            match_expressions=[
                                k8s.V1NodeSelectorRequirement(key=ZONE_KEY, operator="In", values=[want.disk.location])
                            ]
                        )
                    ]
                )
            ),
        ),
    )


def persistent_volume_claim(want: RestoredClaim) -> k8s.V1PersistentVolumeClaim:
    """The claim, named as before and asking for exactly its volume (pure)."""
    annotations = {}
    labels = dict(want.labels)
    if want.username:
        annotations[USERNAME_ANNOTATION] = want.username
    if want.helm_release:
        labels["app.kubernetes.io/managed-by"] = "Helm"
        annotations["meta.helm.sh/release-name"] = want.helm_release
        annotations["meta.helm.sh/release-namespace"] = want.namespace
    return k8s.V1PersistentVolumeClaim(
        api_version="v1",
        kind="PersistentVolumeClaim",
        metadata=k8s.V1ObjectMeta(
            name=want.claim, namespace=want.namespace, labels=labels or None, annotations=annotations or None
        ),
        spec=k8s.V1PersistentVolumeClaimSpec(
            access_modes=list(want.access_modes),
            resources=k8s.V1VolumeResourceRequirements(requests={"storage": want.size}),
            storage_class_name=want.storage_class,
            volume_mode="Filesystem",
            volume_name=want.volume,
        ),
    )


def _create_or_found(
    what: str, create: Callable[[], Any], read: Callable[[], Any], *, retries: int, backoff: float, deadline: float
) -> tuple[Any, bool]:
    """Create; one that exists already (409: an earlier run's) is read back instead.
    (the object, whether it was made now)"""
    try:
        return _call(what, create, deadline, retries, backoff), True
    except KubernetesApiError as exc:
        if exc.code != 409:
            raise
    return _call(what.replace("create", "read", 1), read, deadline, retries, backoff), False


def ensure_namespace(api: k8s.ApiClient, namespace: str, *, retries: int = 5, backoff: float = 1.0) -> None:
    """The namespace exists (made when it does not: a new cluster has none of ours)."""
    core = k8s.CoreV1Api(api)
    deadline = time.monotonic() + 600
    body = k8s.V1Namespace(api_version="v1", kind="Namespace", metadata=k8s.V1ObjectMeta(name=namespace))
    _create_or_found(
        f"create namespace {namespace}",
        lambda: core.create_namespace(body, _request_timeout=REQUEST_TIMEOUT),
        lambda: core.read_namespace(namespace, _request_timeout=REQUEST_TIMEOUT),
        retries=retries, backoff=backoff, deadline=deadline,
    )


def bind_restored_claims(
    api: k8s.ApiClient, wants: list[RestoredClaim], *, retries: int = 5, backoff: float = 1.0
) -> list[str]:
    """Each claim bound again to its restored disk: its volume and its claim created (an
    earlier run's are taken as they are, when they name the same disk and volume; any other
    is an error naming it, and nothing of it is changed). The claims that were created."""
    core = k8s.CoreV1Api(api)
    deadline = time.monotonic() + 600
    made = []
    for want in wants:
        pv, _ = _create_or_found(
            f"create persistent volume {want.volume}",
            lambda: core.create_persistent_volume(persistent_volume(want), _request_timeout=REQUEST_TIMEOUT),
            lambda: core.read_persistent_volume(want.volume, _request_timeout=REQUEST_TIMEOUT),
            retries=retries, backoff=backoff, deadline=deadline,
        )
        found = volume_disk(pv)
        if found is None or (found.name, found.location) != (want.disk.name, want.disk.location):
            raise KubernetesError(
                f"persistent volume {want.volume} exists on {found.path if found else 'no GCE disk'}, not on {want.disk.path}"
            )
        pvc, created = _create_or_found(
            f"create persistent volume claim {want.namespace}/{want.claim}",
            lambda: core.create_namespaced_persistent_volume_claim(
                want.namespace, persistent_volume_claim(want), _request_timeout=REQUEST_TIMEOUT
            ),
            lambda: core.read_namespaced_persistent_volume_claim(want.claim, want.namespace, _request_timeout=REQUEST_TIMEOUT),
            retries=retries, backoff=backoff, deadline=deadline,
        )
        if (pvc.spec.volume_name if pvc.spec else None) != want.volume:
            raise KubernetesError(
                f"claim {want.namespace}/{want.claim} exists on volume {pvc.spec.volume_name if pvc.spec else None}, "
                f"not on {want.volume} (the restored disk {want.disk.name})"
            )
        if created:
            made.append(want.claim)
    task_logger().info("claims bound to restored disks: %d (%d made now)", len(wants), len(made))
    return made
