"""A Kubernetes API server (core/v1) on loopback that keeps state, for tests of
tasks/kubernetes.py through the real ``kubernetes`` client.

It serves HTTPS, as a GKE control plane does: the kubeconfig olab writes
(``tasks.gke.write_kubeconfig``) always points at ``https://ENDPOINT`` with the cluster's CA
as ``certificate-authority-data``, and the client loads that CA only for an https server.
So the fake makes its own CA (``fake_ca_base64()``: base64 of the PEM, as GKE gives it in
``masterAuth.clusterCaCertificate``) and a server certificate for 127.0.0.1 signed by it; a
test writes the kubeconfig from a ``ClusterInfo`` with ``endpoint=fake.endpoint`` and
``ca_certificate=fake.ca_certificate``. With ``token`` set, every request must carry
``Authorization: Bearer <token>`` (else 401, as the API server answers).

Every answer is built from the client library's own models (``V1Pod``, ``CoreV1Event``,
``V1PersistentVolumeClaim``, ``V1PersistentVolume``, ``V1Secret``, ``V1Namespace``,
``V1Node``, ``V1Status``, the ``...List`` kinds) and serialized with
``ApiClient.sanitize_for_serialization``, so names are the real ones (camelCase,
apiVersion/kind, metadata). As the API server does: a get carries ``kind``/``apiVersion``,
a list's items do not; lists come sorted by namespace and name; timestamps are RFC 3339 in
UTC (``2025-05-02T14:03:11Z``); objects have a uid, a resourceVersion and a
creationTimestamp. Request bodies are read back with the client's own deserializer, so a
field sent under a wrong name is lost here as it would be there.

What it models (``/api/v1``):

* namespaces: list, get, create (a list in a namespace that does not exist is empty, as there;
  a get or a create in it is 404);
* pods: list (one namespace or all), get; ``labelSelector`` (``=``, ``==``, ``!=``, ``in``,
  ``notin``, ``key``, ``!key``) and ``fieldSelector`` (``status.phase``, ``spec.nodeName``,
  ``metadata.name``, ...; ``=``, ``==``, ``!=``); an unsupported field is 400
  ``field label not supported: X``;
* events: list with ``fieldSelector`` ``involvedObject.name=...`` (and the other fields the
  API server indexes), get;
* persistentvolumeclaims and persistentvolumes: list, get, create, delete. A claim created
  with ``spec.volumeName`` of an Available volume (or one whose ``claimRef`` names it) is
  bound both ways, as the PV controller does (static binding: how a retained disk is
  attached again); without one it stays Pending (GKE's ``standard-rwo`` waits for a
  consumer). Deleting a claim releases its volume: ``Retain`` leaves it ``Released`` with
  its ``claimRef``, ``Delete`` removes the volume and records its disk in
  ``deleted_disks``. A claim a running pod mounts stays Terminating (pvc-protection);
* secrets: list (``labelSelector``, ``fieldSelector`` ``type=``), get, create, delete;
* nodes: list with ``labelSelector``, get;
* ``/version``, and legacy discovery (``/api``, ``/apis``, ``/api/v1``), so kubectl and
  helm can be pointed at it too;
* 404 with a V1Status body for a missing object (``pods "x" not found``), 409 for one that
  exists, 422 for an invalid one, 405 for a verb a resource does not take here;
* ``deny(verb, resource, ...)``: 403 as RBAC words it on GKE (``secrets is forbidden: User
  "..." cannot list resource "secrets" in API group "" in the namespace "olab": requires one
  of ["container.secrets.list"] permission(s).``), until ``allow()``;
* ``fail(path, code, times=N)``: the next N calls of a path answer ``code`` with a V1Status
  body (503 ServiceUnavailable, 429 TooManyRequests, ...);
* ``calls(path)`` / ``counts()``: how many requests a path got (failures included).

Seeding (state a test sets up, as the cluster would have it): ``add_namespace``,
``add_node``, ``add_pod`` (phase, ``SeedContainer`` states such as ImagePullBackOff or
CrashLoopBackOff, an Unschedulable condition), ``add_event``, ``add_pv``/``add_pvc`` and
``add_claim`` (a claim bound to a volume on a GCE disk, as GKE's PD CSI driver provisions
it), ``add_helm_release`` (a release as Helm's secrets storage driver keeps it: see
``helm_release`` and ``helm_release_secret``), ``add_secret``. ``get(resource, name,
namespace)`` reads the state back.

Helm's storage format (helm/helm ``pkg/storage/driver/secrets.go`` and ``util.go``, the same
in Helm 3 and 4): a Secret of type ``helm.sh/release.v1`` named
``sh.helm.release.v1.<release>.v<revision>``, labelled ``name``, ``owner=helm``, ``status``,
``version`` (and ``createdAt`` or ``modifiedAt``, unix seconds, and the release's own
labels), whose ``data.release`` holds base64 (Helm's ``encodeRelease``) of gzip (best
compression) of the release's JSON as Go's ``encoding/json`` writes it; the Secret's data
is base64 again on the wire. The JSON's shape differs between majors (``helm=3|4``): Helm 3
writes ``"deleted":""`` and Helm 4 leaves zero times out and adds ``schemamodtime`` and
``apply_method``.
"""

from __future__ import annotations

import base64
import datetime
import functools
import gzip
import itertools
import json
import re
import socket
import ssl
import tempfile
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from kubernetes import client as k8s

GIT_VERSION = "v1.31.5-gke.1023000"
PD_CSI = "pd.csi.storage.gke.io"
HELM_SECRET_TYPE = "helm.sh/release.v1"
DEFAULT_USER = "olab-deployer@olab-test.iam.gserviceaccount.com"
UTC = datetime.UTC

# ---- TLS -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeTls:
    ca_pem: str
    cert_pem: bytes
    key_pem: bytes


@functools.lru_cache(maxsize=1)
def fake_tls() -> FakeTls:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it, made once per
    test session (strict-verification friendly: CA key usage, key identifiers, SANs)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kubernetes-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"), x509.DNSName("kubernetes.default")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return FakeTls(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM).decode(),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def fake_ca_base64() -> str:
    """The fake's CA as GKE gives a cluster's: base64 of the PEM."""
    return base64.b64encode(fake_tls().ca_pem.encode()).decode()


def _server_context() -> ssl.SSLContext:
    tls = fake_tls()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:
        cert, key = Path(folder) / "tls.crt", Path(folder) / "tls.key"
        cert.write_bytes(tls.cert_pem)
        key.write_bytes(tls.key_pem)
        context.load_cert_chain(cert, key)
    return context


# ---- serialization ---------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(UTC).replace(microsecond=0)


class _Serializer(k8s.ApiClient):
    """The client's own serializer, with times as the API server writes them: metav1.Time
    in whole seconds (``...Z``), MicroTime with microseconds."""

    def sanitize_for_serialization(self, obj):
        if isinstance(obj, datetime.datetime):
            obj = obj.astimezone(UTC)
            return obj.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if obj.microsecond else "%Y-%m-%dT%H:%M:%SZ")
        return super().sanitize_for_serialization(obj)


class _Body:
    """What ``ApiClient.deserialize`` reads: a response's ``data``."""

    def __init__(self, data: str):
        self.data = data


# ---- resources -------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    plural: str
    kind: str
    model: str
    list_model: str
    namespaced: bool
    fields: frozenset[str]
    verbs: frozenset[str] = frozenset({"get", "list"})


_META_FIELDS = {"metadata.name", "metadata.namespace"}
RESOURCES = {
    r.plural: r
    for r in (
        Resource(
            "namespaces", "Namespace", "V1Namespace", "V1NamespaceList", False, frozenset({"metadata.name", "status.phase"}),
            frozenset({"get", "list", "create"}),
        ),
        Resource("nodes", "Node", "V1Node", "V1NodeList", False, frozenset({"metadata.name", "spec.unschedulable"})),
        Resource(
            "persistentvolumes", "PersistentVolume", "V1PersistentVolume", "V1PersistentVolumeList", False,
            frozenset({"metadata.name"}), frozenset({"get", "list", "create", "delete"}),
        ),
        Resource(
            "pods", "Pod", "V1Pod", "V1PodList", True,
            frozenset(_META_FIELDS | {
                "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName",
            }),
        ),
        Resource(
            "events", "Event", "CoreV1Event", "CoreV1EventList", True,
            frozenset(_META_FIELDS | {
                "involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
                "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
                "reason", "reportingComponent", "source", "type",
            }),
        ),
        Resource(
            "persistentvolumeclaims", "PersistentVolumeClaim", "V1PersistentVolumeClaim", "V1PersistentVolumeClaimList", True,
            frozenset(_META_FIELDS), frozenset({"get", "list", "create", "delete"}),
        ),
        Resource(
            "secrets", "Secret", "V1Secret", "V1SecretList", True,
            frozenset(_META_FIELDS | {"type"}), frozenset({"get", "list", "create", "delete"}),
        ),
    )
}

_SHORT_NAMES = {
    "namespaces": ["ns"], "nodes": ["no"], "persistentvolumes": ["pv"], "pods": ["po"], "events": ["ev"],
    "persistentvolumeclaims": ["pvc"],
}
REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "AlreadyExists",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
DEFAULT_MESSAGES = {
    429: "the server has received too many requests and has asked us to try again later",
    500: "an error on the server (\"unknown\") has prevented the request from succeeding",
    503: "the server is currently unable to handle the request",
    504: "the server was unable to return a response in the time allotted, but may still be processing the request",
}


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None, details: k8s.V1StatusDetails | None = None):
        self.code, self.message, self.reason, self.details = code, message, reason or REASONS.get(code, "Unknown"), details


def status_object(code: int, message: str, reason: str | None = None, details: k8s.V1StatusDetails | None = None) -> k8s.V1Status:
    """A V1Status as the API server answers an error with."""
    return k8s.V1Status(
        api_version="v1", kind="Status", metadata=k8s.V1ListMeta(), status="Failure",
        message=message, reason=reason or REASONS.get(code, "Unknown"), details=details, code=code,
    )


# ---- selectors -------------------------------------------------------------------------

_LABEL_KEY = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_REQUIREMENT = re.compile(
    rf"\s*(?:(?P<not>!)\s*(?P<nkey>{_LABEL_KEY})"
    rf"|(?P<key>{_LABEL_KEY})\s*(?:(?P<op>==|=|!=)\s*(?P<value>{_LABEL_VALUE})"
    rf"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?)\s*"
)


def _split_top(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def label_matcher(selector: str):
    """A predicate on a labels dict, from a label selector; ValueError when it does not parse."""
    tests = []
    if not selector.strip():
        return lambda labels: True
    for part in _split_top(selector):
        m = _REQUIREMENT.fullmatch(part)
        if not m:
            raise ValueError(f"unable to parse requirement: found '{part.strip()}', expected: identifier")
        if m["nkey"]:
            tests.append(lambda labels, k=m["nkey"]: k not in labels)
        elif m["op"]:
            key, value = m["key"], m["value"]
            if m["op"] == "!=":
                tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                tests.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif m["setop"]:
            values = {v.strip() for v in m["values"].split(",") if v.strip()}
            if not values:
                raise ValueError(f"unable to parse requirement: for '{m['setop']}' operator, values set can't be empty")
            if m["setop"] == "in":
                tests.append(lambda labels, k=m["key"], vs=values: labels.get(k) in vs)
            else:
                tests.append(lambda labels, k=m["key"], vs=values: labels.get(k) not in vs)
        else:
            tests.append(lambda labels, k=m["key"]: k in labels)
    return lambda labels: all(test(labels or {}) for test in tests)


def _split_escaped(text: str, sep: str) -> list[str]:
    parts, current, escaped = [], "", False
    for char in text:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == sep:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _field_value(obj: dict, path: str) -> str:
    if path == "source":
        value: Any = (obj.get("source") or {}).get("component")
    else:
        value = obj
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None and path in ("spec.hostNetwork", "spec.unschedulable"):
        return "false"
    return "" if value is None else str(value)


def field_matcher(selector: str, allowed: frozenset[str]):
    """A predicate on a serialized object, from a field selector; ValueError (the API's
    message) for a term that does not parse or a field the resource does not index."""
    tests = []
    for term in _split_escaped(selector, ","):
        if not term.strip():
            continue
        m = re.fullmatch(r"\s*([A-Za-z.]+)\s*(!=|==|=)(.*)", term)
        if not m:
            raise ValueError(f"invalid selector: '{term}'; can't understand '{term}'")
        name, op, value = m.group(1), m.group(2), m.group(3).strip()
        if name not in allowed:
            raise ValueError(f"field label not supported: {name}")
        if op == "!=":
            tests.append(lambda obj, n=name, v=value: _field_value(obj, n) != v)
        else:
            tests.append(lambda obj, n=name, v=value: _field_value(obj, n) == v)
    return lambda obj: all(test(obj) for test in tests)


# ---- Helm's storage --------------------------------------------------------------------


def go_time(when: datetime.datetime, nanos: int = 0) -> str:
    """A time as Go's ``time.Time.MarshalJSON`` writes it: RFC 3339 with nanoseconds (trailing
    zeros cut) and the zone's offset (``Z`` for UTC)."""
    fraction = f"{when.microsecond:06d}{nanos % 1000:03d}".rstrip("0")
    text = when.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "")
    offset = when.utcoffset()
    if offset is None or offset == datetime.timedelta(0):
        return text + "Z"
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _go_map(value: Any) -> Any:
    """A Go ``map[string]any`` as encoding/json writes it: keys sorted (recursively)."""
    if isinstance(value, dict):
        return {k: _go_map(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_go_map(v) for v in value]
    return value


def go_json(value: Any) -> bytes:
    """JSON as Go's ``json.Marshal`` writes it: compact, UTF-8, ``<``, ``>``, ``&``, U+2028
    and U+2029 escaped (dict order is the struct's field order; maps go through _go_map)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text.encode()


def helm_release(
    name: str,
    namespace: str,
    version: int,
    status: str = "deployed",
    *,
    chart: str = "jupyterhub",
    chart_version: str = "4.4.0",
    app_version: str = "5.4.3",
    config: dict | None = None,
    chart_values: dict | None = None,
    description: str | None = None,
    first_deployed: datetime.datetime | None = None,
    last_deployed: datetime.datetime | None = None,
    manifest: str | None = None,
    notes: str = "",
    helm: int = 4,
) -> dict:
    """A release (helm's ``release.Release``) as the JSON Helm ``helm`` (3 or 4) marshals:
    struct fields in their declared order, maps sorted, zero times as that major writes
    them. ``config`` is the user-supplied values (what ``helm get values`` shows)."""
    last = last_deployed or datetime.datetime(2025, 5, 2, 14, 3, 11, 123456, tzinfo=UTC)
    first = first_deployed or last
    default_description = {
        "deployed": "Install complete" if version == 1 else "Upgrade complete",
        "superseded": "Upgrade complete",
        "failed": f"Upgrade \"{name}\" failed: context deadline exceeded",
        "pending-install": "Initial install underway",
        "pending-upgrade": "Preparing upgrade",
        "pending-rollback": f"Rollback to {max(version - 1, 1)}",
        "uninstalling": "Deletion in progress (or silently failed)",
        "uninstalled": "Uninstallation complete",
    }
    info: dict[str, Any] = {"first_deployed": go_time(first, 789), "last_deployed": go_time(last, 789)}
    if helm == 3:
        info["deleted"] = ""  # helm.sh/helm/v3/pkg/time: a zero time marshals as ""
    info["description"] = description if description is not None else default_description.get(status, status)
    info["status"] = status
    if notes:
        info["notes"] = notes
    metadata = {
        "name": chart,
        "home": "https://z2jh.jupyter.org",
        "sources": ["https://github.com/jupyterhub/zero-to-jupyterhub-k8s"],
        "version": chart_version,
        "description": "Multi-user Jupyter installation",
        "keywords": ["jupyter", "jupyterhub", "z2jh"],
        "maintainers": [{"name": "Erik Sundell", "email": "erik@sundellopensource.se"}],
        "icon": "https://hub.jupyter.org/helm-chart/images/hublogo.svg",
        "apiVersion": "v2",
        "appVersion": app_version,
        "annotations": _go_map({"artifacthub.io/images": "- image: quay.io/jupyterhub/k8s-hub:" + chart_version}),
        "kubeVersion": ">=1.28.0-0",
    }
    template = b"apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: hub-db-dir\n{{- /* & < > */}}\n"
    chart_json: dict[str, Any] = {
        "metadata": metadata,
        "lock": None,
        "templates": [{"name": "templates/hub/pvc.yaml", "data": base64.b64encode(template).decode()}],
        "values": _go_map(
            chart_values if chart_values is not None
            else {"hub": {"db": {"type": "sqlite-pvc"}}, "singleuser": {"storage": {"type": "dynamic"}}}
        ),
        "schema": base64.b64encode(b'{"$schema":"http://json-schema.org/draft-07/schema#","type":"object"}').decode(),
    }
    if helm == 4:
        chart_json["schemamodtime"] = "0001-01-01T00:00:00Z"  # time.Time without omitzero
    chart_json["files"] = [{"name": "README.md", "data": base64.b64encode(b"# JupyterHub\n").decode()}]
    release: dict[str, Any] = {"name": name, "info": info, "chart": chart_json}
    if config:
        release["config"] = _go_map(config)
    release["manifest"] = manifest if manifest is not None else (
        "---\n# Source: jupyterhub/templates/hub/pvc.yaml\nkind: PersistentVolumeClaim\napiVersion: v1\n"
        "metadata:\n  name: hub-db-dir\n"
    )
    release["version"] = version
    release["namespace"] = namespace
    if helm == 4:
        release["apply_method"] = "ssa"
    return release


def encode_release(release: dict) -> str:
    """Helm's ``encodeRelease``: base64 (standard) of gzip (best compression) of the JSON."""
    return base64.b64encode(gzip.compress(go_json(release), compresslevel=9, mtime=0)).decode()


def helm_release_secret(
    release: dict,
    *,
    labels: dict[str, str] | None = None,
    created_at: int | None = None,
    modified_at: int | None = None,
) -> k8s.V1Secret:
    """The Secret Helm's secrets driver writes for ``release`` (``newSecretsObject``): its
    custom labels, then name/owner/status/version; ``createdAt`` when it was made by
    Create, ``modifiedAt`` when last written by Update."""
    lbs = dict(labels or {})
    if created_at is not None:
        lbs["createdAt"] = str(created_at)
    if modified_at is not None:
        lbs["modifiedAt"] = str(modified_at)
    lbs.update(name=release["name"], owner="helm", status=release["info"]["status"], version=str(release["version"]))
    return k8s.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=k8s.V1ObjectMeta(name=f"sh.helm.release.v1.{release['name']}.v{release['version']}", labels=lbs),
        type=HELM_SECRET_TYPE,
        # The wire form of a Secret's data is base64 of its bytes; the bytes are Helm's base64.
        data={"release": base64.b64encode(encode_release(release).encode()).decode()},
    )


# ---- seeding helpers -------------------------------------------------------------------


@dataclass
class SeedContainer:
    """A container's status: ``state`` running, waiting (``reason`` such as
    ImagePullBackOff, CrashLoopBackOff, ContainerCreating) or terminated (``exit_code``);
    ``last_reason`` makes a lastState.terminated (OOMKilled, Error) with ``last_exit_code``."""

    name: str
    image: str = "quay.io/jupyterhub/k8s-hub:4.4.0"
    state: str = "running"
    reason: str | None = None
    message: str | None = None
    exit_code: int = 0
    restarts: int = 0
    ready: bool | None = None
    last_reason: str | None = None
    last_exit_code: int = 1
    init: bool = False


_WAITING_MESSAGES = {
    "ImagePullBackOff": 'Back-off pulling image "{image}"',
    "ErrImagePull": 'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": not found',
    "CrashLoopBackOff": "back-off 5m0s restarting failed container={name} pod={pod}",
    "CreateContainerConfigError": 'secret "hub" not found',
}


@dataclass
class _Store:
    objects: dict[tuple[str, str, str], Any] = field(default_factory=dict)

    def key(self, resource: str, namespace: str | None, name: str) -> tuple[str, str, str]:
        return (resource, namespace or "", name)


class FakeKubernetes:
    def __init__(
        self,
        *,
        project: str = "olab-test",
        zone: str = "europe-west2-a",
        token: str | None = None,
        user: str = DEFAULT_USER,
        namespaces: tuple[str, ...] = ("default", "kube-system", "kube-public", "kube-node-lease"),
    ):
        self.project, self.zone, self.token, self.user = project, zone, token, user
        self.store = _Store()
        self.requests: list[tuple[str, str]] = []
        self.queries: list[tuple[str, str, dict[str, list[str]]]] = []
        self.authorizations: list[str | None] = []
        self.deleted_disks: list[str] = []
        self.tls_failures: list[str] = []
        self._failures: list[dict] = []
        self._denials: list[dict] = []
        self._version = itertools.count(1000)
        self._ids = itertools.count(1)
        self.lock = threading.RLock()
        self._serializer = _Serializer()
        self._connections: set = set()
        for name in namespaces:
            self.add_namespace(name)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as urllib3's pool expects

            def log_message(self, *args) -> None:
                pass

            def setup(self) -> None:
                self.request.settimeout(10)
                super().setup()

            def _send(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Audit-Id", str(uuid.uuid4()))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                path, _, query = self.path.partition("?")
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode() if length else ""
                status, body = fake.handle(method, unquote(path), query, raw, self.headers.get("Authorization"))
                self._send(status, body)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

        context = _server_context()

        class Server(ThreadingHTTPServer):
            daemon_threads = False
            block_on_close = True

            def get_request(self):
                sock, address = self.socket.accept()
                # Headers and body go out in separate writes: without this, Nagle's algorithm
                # and the client's delayed ACK hold the body back ~40 ms per request.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                with fake.lock:
                    fake._connections.add(tls)
                return tls, address

            def finish_request(self, request, client_address) -> None:
                try:
                    request.settimeout(10)
                    request.do_handshake()
                except (ssl.SSLError, OSError) as exc:
                    fake.tls_failures.append(f"{type(exc).__name__}: {exc}")
                    return
                super().finish_request(request, client_address)

            def shutdown_request(self, request) -> None:
                with fake.lock:
                    fake._connections.discard(request)
                super().shutdown_request(request)

            def handle_error(self, request, client_address) -> None:
                pass  # a client that went away mid-request

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"127.0.0.1:{self.port}"
        self.url = f"https://{self.endpoint}"
        self.ca_certificate = fake_ca_base64()
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-kubernetes", daemon=True
        )

    def __enter__(self) -> FakeKubernetes:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        # Keep-alive connections a client still holds: end them, so their handler threads
        # return and server_close can join every one.
        with self.lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                # The plain socket's shutdown: the handler thread's blocked read sees EOF.
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass
        self.server.server_close()
        self.thread.join(timeout=5)

    # ---- what tests use --------------------------------------------------------------

    def calls(self, path: str, method: str | None = None) -> int:
        """Requests a path got (its query string aside), of one method or any."""
        with self.lock:
            return sum(1 for m, p in self.requests if p == path and (method is None or m == method))

    def counts(self) -> Counter:
        with self.lock:
            return Counter(f"{m} {p}" for m, p in self.requests)

    def fail(self, path: str, code: int = 503, *, times: int = 1, message: str | None = None, method: str | None = None) -> None:
        """The next ``times`` calls of ``path`` (any method, or ``method``) answer ``code``
        with a V1Status body."""
        text = message or DEFAULT_MESSAGES.get(code, REASONS.get(code, "error"))
        with self.lock:
            self._failures.append({"path": path, "method": method, "left": times, "code": code, "message": text})

    def deny(
        self, verb: str, resource: str, namespace: str | None = None, *, name: str | None = None, message: str | None = None
    ) -> None:
        """RBAC/IAM says no to ``verb`` on ``resource`` (in ``namespace``, or anywhere;
        one object, or any): 403 as GKE words it, until ``allow()``."""
        with self.lock:
            self._denials.append({"verb": verb, "resource": resource, "namespace": namespace, "name": name, "message": message})

    def allow(self) -> None:
        with self.lock:
            self._denials.clear()

    def get(self, resource: str, name: str, namespace: str | None = None) -> Any:
        """The stored object (a client model), or None."""
        with self.lock:
            return self.store.objects.get(self.store.key(resource, namespace, name))

    def reset(self) -> None:
        """Everything gone, as for a cluster deleted and made anew: namespaces, claims,
        volumes, secrets (Helm's releases), pods, events; the nodes stay."""
        with self.lock:
            for key in [k for k in self.store.objects if k[0] != "nodes"]:
                del self.store.objects[key]

    def names(self, resource: str, namespace: str | None = None) -> list[str]:
        with self.lock:
            return sorted(n for (r, ns, n) in self.store.objects if r == resource and (namespace is None or ns == namespace))

    # ---- seeding ---------------------------------------------------------------------

    def _meta(
        self,
        name: str,
        namespace: str | None = None,
        labels: dict | None = None,
        annotations: dict | None = None,
        created: datetime.datetime | None = None,
    ) -> k8s.V1ObjectMeta:
        return k8s.V1ObjectMeta(
            name=name,
            namespace=namespace,
            labels=dict(labels) if labels else None,
            annotations=dict(annotations) if annotations else None,
            uid=str(uuid.uuid4()),
            resource_version=str(next(self._version)),
            creation_timestamp=created or _now(),
        )

    def _put(self, resource: str, obj: Any) -> Any:
        spec = RESOURCES[resource]
        obj.api_version, obj.kind = "v1", spec.kind
        with self.lock:
            self.store.objects[self.store.key(resource, obj.metadata.namespace if spec.namespaced else None, obj.metadata.name)] = obj
        return obj

    def add_namespace(self, name: str, labels: dict | None = None) -> k8s.V1Namespace:
        meta = self._meta(name, labels={"kubernetes.io/metadata.name": name, **(labels or {})})
        return self._put(
            "namespaces",
            k8s.V1Namespace(
                metadata=meta, spec=k8s.V1NamespaceSpec(finalizers=["kubernetes"]), status=k8s.V1NamespaceStatus(phase="Active")
            ),
        )

    def add_node(
        self, name: str, *, pool: str = "core", labels: dict | None = None, ready: bool = True, unschedulable: bool = False
    ) -> k8s.V1Node:
        """A GKE node of ``pool``, labelled as GKE and olab's terraform label them."""
        all_labels = {
            "cloud.google.com/gke-nodepool": pool,
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "node.kubernetes.io/instance-type": "e2-standard-2",
            "topology.kubernetes.io/zone": self.zone,
            "topology.gke.io/zone": self.zone,
            "hub.jupyter.org/node-purpose": pool,
            **(labels or {}),
        }
        now = _now()
        node = k8s.V1Node(
            metadata=self._meta(name, labels=all_labels),
            spec=k8s.V1NodeSpec(
                provider_id=f"gce://{self.project}/{self.zone}/{name}",
                unschedulable=True if unschedulable else None,
            ),
            status=k8s.V1NodeStatus(
                conditions=[
                    k8s.V1NodeCondition(
                        type="Ready",
                        status="True" if ready else "Unknown",
                        reason="KubeletReady" if ready else "NodeStatusUnknown",
                        message="kubelet is posting ready status" if ready else "Kubelet stopped posting node status.",
                        last_heartbeat_time=now,
                        last_transition_time=now,
                    )
                ],
                capacity={"cpu": "2", "memory": "8148428Ki", "pods": "110"},
                allocatable={"cpu": "1930m", "memory": "6055884Ki", "pods": "110"},
                node_info=k8s.V1NodeSystemInfo(
                    architecture="amd64", boot_id=str(uuid.uuid4()), container_runtime_version="containerd://1.7.24",
                    kernel_version="6.1.112+", kube_proxy_version=GIT_VERSION, kubelet_version=GIT_VERSION,
                    machine_id=uuid.uuid4().hex, operating_system="linux", os_image="Container-Optimized OS from Google",
                    system_uuid=str(uuid.uuid4()),
                ),
            ),
        )
        return self._put("nodes", node)

    def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        phase: str = "Running",
        labels: dict | None = None,
        containers: list[SeedContainer] | None = None,
        node: str | None = "gke-olab-core-0",
        unschedulable: str | None = None,
        reason: str | None = None,
        message: str | None = None,
        claims: tuple[str, ...] = (),
        created: datetime.datetime | None = None,
    ) -> k8s.V1Pod:
        """A pod in ``phase``. ``unschedulable``: the scheduler's message (the pod is Pending,
        PodScheduled False/Unschedulable, on no node). ``reason``/``message``: the pod's own
        (Evicted, say). ``claims``: PVCs it mounts."""
        containers = containers if containers is not None else [SeedContainer(name=name.split("-")[0] or "main")]
        now = _now()
        if unschedulable is not None:
            node = None
        volumes = [
            k8s.V1Volume(name=f"vol-{i}", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=c))
            for i, c in enumerate(claims)
        ]
        spec = k8s.V1PodSpec(
            containers=[k8s.V1Container(name=c.name, image=c.image) for c in containers if not c.init],
            init_containers=[k8s.V1Container(name=c.name, image=c.image) for c in containers if c.init] or None,
            node_name=node,
            restart_policy="Always",
            scheduler_name="default-scheduler",
            service_account_name="default",
            volumes=volumes or None,
        )
        statuses, init_statuses = [], []
        for c in containers:
            (init_statuses if c.init else statuses).append(self._container_status(c, name, now))
        all_ready = phase == "Running" and all(s.ready for s in statuses)
        conditions = []
        if unschedulable is not None:
            conditions.append(
                k8s.V1PodCondition(
                    type="PodScheduled", status="False", reason="Unschedulable", message=unschedulable, last_transition_time=now
                )
            )
        else:
            unready = [s.name for s in statuses if not s.ready]
            conditions = [
                k8s.V1PodCondition(type="PodReadyToStartContainers", status="True", last_transition_time=now),
                k8s.V1PodCondition(type="Initialized", status="True", last_transition_time=now),
                k8s.V1PodCondition(
                    type="Ready", status="True" if all_ready else "False", last_transition_time=now,
                    reason=None if all_ready else "ContainersNotReady",
                    message=None if all_ready else f"containers with unready status: [{' '.join(unready)}]",
                ),
                k8s.V1PodCondition(
                    type="ContainersReady", status="True" if all_ready else "False", last_transition_time=now,
                    reason=None if all_ready else "ContainersNotReady",
                    message=None if all_ready else f"containers with unready status: [{' '.join(unready)}]",
                ),
                k8s.V1PodCondition(type="PodScheduled", status="True", last_transition_time=now),
            ]
        ip = f"10.{next(self._ids) % 250}.0.{next(self._ids) % 250}"
        status = k8s.V1PodStatus(
            phase=phase,
            conditions=conditions,
            container_statuses=(statuses or None) if unschedulable is None else None,
            init_container_statuses=(init_statuses or None) if unschedulable is None else None,
            host_ip="10.154.0.2" if node else None,
            pod_ip=ip if node and phase == "Running" else None,
            qos_class="Burstable",
            start_time=now if node else None,
            reason=reason,
            message=message,
        )
        pod = k8s.V1Pod(metadata=self._meta(name, namespace, labels, created=created), spec=spec, status=status)
        return self._put("pods", pod)

    def _container_status(self, c: SeedContainer, pod: str, now: datetime.datetime) -> k8s.V1ContainerStatus:
        if c.state == "running":
            state = k8s.V1ContainerState(running=k8s.V1ContainerStateRunning(started_at=now))
        elif c.state == "waiting":
            reason = c.reason or "ContainerCreating"
            message = c.message
            if message is None and reason in _WAITING_MESSAGES:
                message = _WAITING_MESSAGES[reason].format(image=c.image, name=c.name, pod=pod)
            state = k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(reason=reason, message=message))
        elif c.state == "terminated":
            state = k8s.V1ContainerState(
                terminated=k8s.V1ContainerStateTerminated(
                    exit_code=c.exit_code, reason=c.reason or ("Completed" if c.exit_code == 0 else "Error"),
                    message=c.message, started_at=now, finished_at=now, container_id=f"containerd://{uuid.uuid4().hex}",
                )
            )
        else:
            raise ValueError(f"container state {c.state!r}: running, waiting or terminated")
        last = None
        if c.last_reason:
            last = k8s.V1ContainerState(
                terminated=k8s.V1ContainerStateTerminated(
                    exit_code=c.last_exit_code, reason=c.last_reason, started_at=now, finished_at=now,
                    container_id=f"containerd://{uuid.uuid4().hex}",
                )
            )
        pulled = c.state == "running" or (c.state == "waiting" and c.reason == "CrashLoopBackOff") or c.state == "terminated"
        return k8s.V1ContainerStatus(
            name=c.name,
            image=c.image,
            image_id=f"{c.image.split(':')[0]}@sha256:{uuid.uuid4().hex}{uuid.uuid4().hex}" if pulled else "",
            ready=c.ready if c.ready is not None else c.state == "running",
            restart_count=c.restarts,
            started=c.state == "running",
            state=state,
            last_state=last or k8s.V1ContainerState(),
            container_id=f"containerd://{uuid.uuid4().hex}" if pulled else None,
        )

    def add_event(
        self,
        namespace: str,
        involved: str,
        reason: str,
        message: str,
        *,
        type: str = "Warning",
        kind: str = "Pod",
        count: int = 1,
        component: str = "kubelet",
        field_path: str | None = None,
        first: datetime.datetime | None = None,
        last: datetime.datetime | None = None,
    ) -> k8s.CoreV1Event:
        """An event about ``involved`` (a pod, by default), as the kubelet or scheduler records it."""
        target = self.get("pods", involved, namespace) if kind == "Pod" else None
        last = last or _now()
        first = first or last
        event = k8s.CoreV1Event(
            metadata=self._meta(f"{involved}.{uuid.uuid4().int % (1 << 64):x}", namespace, created=first),
            involved_object=k8s.V1ObjectReference(
                api_version="v1", kind=kind, name=involved, namespace=namespace,
                uid=target.metadata.uid if target else None,
                resource_version=target.metadata.resource_version if target else None,
                field_path=field_path,
            ),
            reason=reason,
            message=message,
            type=type,
            count=count,
            first_timestamp=first,
            last_timestamp=last,
            source=k8s.V1EventSource(component=component, host=target.spec.node_name if target and component == "kubelet" else None),
            reporting_component=component,
            reporting_instance=(target.spec.node_name or "") if target and component == "kubelet" else "",
            event_time=None,
        )
        return self._put("events", event)

    def add_pv(
        self,
        name: str,
        *,
        size: str = "10Gi",
        storage_class: str | None = "standard-rwo",
        reclaim_policy: str = "Delete",
        disk: str | None = None,
        zone: str | None = None,
        project: str | None = None,
        in_tree: bool = False,
        claim: tuple[str, str] | None = None,
        phase: str | None = None,
        labels: dict | None = None,
    ) -> k8s.V1PersistentVolume:
        """A volume on the GCE disk ``disk`` (default: the volume's name, as the PD CSI driver
        names the disks it makes), through the CSI driver (``volumeHandle``) or, with
        ``in_tree``, the old ``gcePersistentDisk`` (``pdName``, its zone in labels).
        ``claim`` (namespace, name) pre-binds it."""
        zone, project = zone or self.zone, project or self.project
        disk = disk or name
        source: dict[str, Any] = {}
        all_labels = dict(labels or {})
        if in_tree:
            source["gce_persistent_disk"] = k8s.V1GCEPersistentDiskVolumeSource(pd_name=disk, fs_type="ext4")
            all_labels.update({"topology.kubernetes.io/zone": zone, "topology.kubernetes.io/region": zone.rsplit("-", 1)[0]})
        else:
            source["csi"] = k8s.V1CSIPersistentVolumeSource(
                driver=PD_CSI, fs_type="ext4", volume_handle=f"projects/{project}/zones/{zone}/disks/{disk}",
                volume_attributes={"storage.kubernetes.io/csiProvisionerIdentity": f"1746190000000-{next(self._ids)}-{PD_CSI}"},
            )
        meta = self._meta(name, labels=all_labels or None, annotations={"pv.kubernetes.io/provisioned-by": PD_CSI})
        meta.finalizers = ["kubernetes.io/pv-protection", "external-attacher/pd-csi-storage-gke-io"]
        claim_ref = None
        if claim:
            pvc = self.get("persistentvolumeclaims", claim[1], claim[0])
            claim_ref = k8s.V1ObjectReference(
                api_version="v1", kind="PersistentVolumeClaim", namespace=claim[0], name=claim[1],
                uid=pvc.metadata.uid if pvc else None, resource_version=pvc.metadata.resource_version if pvc else None,
            )
        pv = k8s.V1PersistentVolume(
            metadata=meta,
            spec=k8s.V1PersistentVolumeSpec(
                access_modes=["ReadWriteOnce"],
                capacity={"storage": size},
                claim_ref=claim_ref,
                persistent_volume_reclaim_policy=reclaim_policy,
                storage_class_name=storage_class,
                volume_mode="Filesystem",
                node_affinity=k8s.V1VolumeNodeAffinity(
                    required=k8s.V1NodeSelector(
                        node_selector_terms=[
                            k8s.V1NodeSelectorTerm(
                                match_expressions=[k8s.V1NodeSelectorRequirement(key="topology.gke.io/zone", operator="In", values=[zone])]
                            )
                        ]
                    )
                ) if not in_tree else None,
                **source,
            ),
            status=k8s.V1PersistentVolumeStatus(phase=phase or ("Bound" if claim else "Available"), last_phase_transition_time=_now()),
        )
        return self._put("persistentvolumes", pv)

    def add_pvc(
        self,
        namespace: str,
        name: str,
        *,
        size: str = "10Gi",
        storage_class: str | None = "standard-rwo",
        volume: str | None = None,
        labels: dict | None = None,
        annotations: dict | None = None,
        phase: str = "Pending",
    ) -> k8s.V1PersistentVolumeClaim:
        meta = self._meta(name, namespace, labels, annotations)
        meta.finalizers = ["kubernetes.io/pvc-protection"]
        pvc = k8s.V1PersistentVolumeClaim(
            metadata=meta,
            spec=k8s.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteOnce"],
                resources=k8s.V1VolumeResourceRequirements(requests={"storage": size}),
                storage_class_name=storage_class,
                volume_mode="Filesystem",
                volume_name=volume,
            ),
            status=k8s.V1PersistentVolumeClaimStatus(phase=phase),
        )
        return self._put("persistentvolumeclaims", pvc)

    def add_claim(
        self,
        namespace: str,
        name: str,
        *,
        size: str = "10Gi",
        storage_class: str = "standard-rwo",
        reclaim_policy: str = "Delete",
        disk: str | None = None,
        zone: str | None = None,
        in_tree: bool = False,
        labels: dict | None = None,
        annotations: dict | None = None,
        volume: str | None = None,
    ) -> tuple[k8s.V1PersistentVolumeClaim, k8s.V1PersistentVolume]:
        """A claim dynamically provisioned and bound, as GKE leaves one: PV ``pvc-<claim uid>``
        on a disk of that name (or ``disk``), both Bound, the annotations the PV controller
        and the provisioner add."""
        notes = {
            "pv.kubernetes.io/bind-completed": "yes",
            "pv.kubernetes.io/bound-by-controller": "yes",
            "volume.beta.kubernetes.io/storage-provisioner": PD_CSI,
            "volume.kubernetes.io/storage-provisioner": PD_CSI,
            "volume.kubernetes.io/selected-node": "gke-olab-user-0",
            **(annotations or {}),
        }
        pvc = self.add_pvc(namespace, name, size=size, storage_class=storage_class, labels=labels, annotations=notes, phase="Bound")
        pv_name = volume or f"pvc-{pvc.metadata.uid}"
        pv = self.add_pv(
            pv_name, size=size, storage_class=storage_class, reclaim_policy=reclaim_policy, disk=disk, zone=zone,
            in_tree=in_tree, claim=(namespace, name),
        )
        with self.lock:
            pvc.spec.volume_name = pv_name
            pvc.status = k8s.V1PersistentVolumeClaimStatus(phase="Bound", access_modes=["ReadWriteOnce"], capacity={"storage": size})
        return pvc, pv

    def add_secret(
        self, namespace: str, name: str, data: dict[str, bytes], *, type: str = "Opaque", labels: dict | None = None
    ) -> k8s.V1Secret:
        secret = k8s.V1Secret(
            metadata=self._meta(name, namespace, labels),
            type=type,
            data={k: base64.b64encode(v).decode() for k, v in data.items()},
        )
        return self._put("secrets", secret)

    def add_helm_release(
        self,
        release: dict,
        *,
        labels: dict[str, str] | None = None,
        created_at: int | None = None,
        modified_at: int | None = None,
    ) -> k8s.V1Secret:
        """A release (a dict as ``helm_release`` makes it, Helm's JSON) stored as Helm's secrets
        driver stores it, in the release's namespace."""
        if created_at is None and modified_at is None:
            created_at = 1746194591
        secret = helm_release_secret(release, labels=labels, created_at=created_at, modified_at=modified_at)
        namespace = release["namespace"]
        meta = self._meta(secret.metadata.name, namespace, secret.metadata.labels)
        secret.metadata = meta
        return self._put("secrets", secret)

    # ---- the API ---------------------------------------------------------------------

    def handle(self, method: str, path: str, query: str, raw: str, authorization: str | None) -> tuple[int, str]:
        with self.lock:
            self.requests.append((method, path))
            self.authorizations.append(authorization)
            params = parse_qs(query, keep_blank_values=True)
            self.queries.append((method, path, params))
            try:
                if self.token is not None and authorization != f"Bearer {self.token}":
                    raise ApiError(401, "Unauthorized")
                for rule in self._failures:
                    if rule["left"] > 0 and rule["path"] == path and rule["method"] in (None, method):
                        rule["left"] -= 1
                        raise ApiError(rule["code"], rule["message"])
                body = self._answer(method, path, params, raw)
                return (201 if method == "POST" else 200), json.dumps(body)
            except ApiError as exc:
                status = status_object(exc.code, exc.message, exc.reason, exc.details)
                return exc.code, json.dumps(self._serializer.sanitize_for_serialization(status))

    def _answer(self, method: str, path: str, params: dict[str, list[str]], raw: str) -> Any:
        parts = [p for p in path.split("/") if p]
        if parts == ["version"] and method == "GET":
            return self._serializer.sanitize_for_serialization(self._version_info())
        if method == "GET" and parts in (["api"], ["apis"], ["api", "v1"]):
            return self._serializer.sanitize_for_serialization(self._discovery(parts))
        if parts[:2] != ["api", "v1"] or len(parts) < 3:
            raise ApiError(404, "the server could not find the requested resource")
        rest = parts[2:]
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 2:  # a subresource (status, log, ...): not modelled
            raise ApiError(404, "the server could not find the requested resource")
        resource = RESOURCES.get(rest[0])
        name = rest[1] if len(rest) == 2 else None
        if resource is None or (namespace is not None and not resource.namespaced):
            raise ApiError(404, "the server could not find the requested resource")
        if resource.namespaced and namespace is None and method != "GET" or (resource.namespaced and namespace is None and name):
            raise ApiError(404, "the server could not find the requested resource")
        verb = {"GET": "get" if name else "list", "POST": "create", "DELETE": "delete" if name else "deletecollection"}.get(
            method, method.lower()
        )
        self._authorize(verb, resource, namespace, name)
        if verb not in resource.verbs or (verb == "create" and name):
            raise ApiError(405, "the server does not allow this method on the requested resource")
        if verb == "list":
            return self._list(resource, namespace, params)
        if verb == "get":
            return self._item(self._lookup(resource, namespace, name))
        if verb == "create":
            return self._create(resource, namespace, raw)
        return self._delete(resource, namespace, name)

    def _authorize(self, verb: str, resource: Resource, namespace: str | None, name: str | None) -> None:
        for rule in self._denials:
            if rule["verb"] != verb or rule["resource"] != resource.plural:
                continue
            if rule["namespace"] is not None and rule["namespace"] != namespace:
                continue
            if rule["name"] is not None and rule["name"] != name:
                continue
            what = f'{resource.plural} "{name}"' if name else resource.plural
            where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            message = rule["message"] or (
                f'{what} is forbidden: User "{self.user}" cannot {verb} resource "{resource.plural}" '
                f'in API group "" {where}: requires one of ["container.{resource.plural}.{verb}"] permission(s).'
            )
            raise ApiError(403, message, details=k8s.V1StatusDetails(name=name, kind=resource.plural))

    def _discovery(self, parts: list[str]) -> Any:
        """Legacy discovery (``/api``, ``/apis``, ``/api/v1``): what kubectl and helm read
        before anything else (they fall back to it from aggregated discovery)."""
        if parts == ["api"]:
            return k8s.V1APIVersions(
                kind="APIVersions", versions=["v1"],
                server_address_by_client_cidrs=[k8s.V1ServerAddressByClientCIDR(client_cidr="0.0.0.0/0", server_address=self.endpoint)],
            )
        if parts == ["apis"]:
            return k8s.V1APIGroupList(kind="APIGroupList", api_version="v1", groups=[])
        return k8s.V1APIResourceList(
            kind="APIResourceList",
            group_version="v1",
            resources=[
                k8s.V1APIResource(
                    name=r.plural, singular_name=r.kind.lower(), namespaced=r.namespaced, kind=r.kind,
                    verbs=sorted(r.verbs | {"watch"} if "list" in r.verbs else r.verbs),
                    short_names=_SHORT_NAMES.get(r.plural),
                )
                for r in RESOURCES.values()
            ],
        )

    def _version_info(self) -> k8s.VersionInfo:
        return k8s.VersionInfo(
            major="1", minor="31", git_version=GIT_VERSION, git_commit="0b8f7d3c0a5e", git_tree_state="clean",
            build_date="2025-01-15T09:12:46Z", go_version="go1.22.10 X:boringcrypto", compiler="gc", platform="linux/amd64",
        )

    def _not_found(self, resource: Resource, name: str) -> ApiError:
        return ApiError(404, f'{resource.plural} "{name}" not found', details=k8s.V1StatusDetails(name=name, kind=resource.plural))

    def _lookup(self, resource: Resource, namespace: str | None, name: str) -> Any:
        found = self.store.objects.get(self.store.key(resource.plural, namespace, name))
        if found is None:
            raise self._not_found(resource, name)
        return found

    def _item(self, obj: Any) -> dict:
        return self._serializer.sanitize_for_serialization(obj)

    def _list(self, resource: Resource, namespace: str | None, params: dict[str, list[str]]) -> dict:
        try:
            labels = label_matcher((params.get("labelSelector") or [""])[0])
            fields = field_matcher((params.get("fieldSelector") or [""])[0], resource.fields)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        items = []
        for (kind, ns, _name), obj in sorted(self.store.objects.items(), key=lambda kv: kv[0]):
            if kind != resource.plural or (namespace is not None and ns != namespace):
                continue
            data = self._serializer.sanitize_for_serialization(obj)
            if not labels(obj.metadata.labels or {}) or not fields(data):
                continue
            data.pop("kind", None)
            data.pop("apiVersion", None)
            items.append(data)
        model = getattr(k8s, resource.list_model)(
            api_version="v1", kind=f"{resource.kind}List", metadata=k8s.V1ListMeta(resource_version=str(next(self._version))), items=[]
        )
        body = self._serializer.sanitize_for_serialization(model)
        body["items"] = items
        return body

    def _read(self, resource: Resource, raw: str) -> Any:
        try:
            return self._serializer.deserialize(_Body(raw or "{}"), resource.model)
        except (ValueError, TypeError) as exc:
            raise ApiError(400, f"the body of the request was in an unknown format: {exc}") from None

    def _create(self, resource: Resource, namespace: str | None, raw: str) -> dict:
        obj = self._read(resource, raw)
        meta = obj.metadata or k8s.V1ObjectMeta()
        if not meta.name:
            raise ApiError(422, f'{resource.kind} "" is invalid: metadata.name: Required value: name or generateName is required')
        if resource.namespaced:
            if meta.namespace and meta.namespace != namespace:
                raise ApiError(400, "the namespace of the provided object does not match the namespace sent on the request")
            if self.store.key("namespaces", None, namespace) not in self.store.objects:
                raise ApiError(404, f'namespaces "{namespace}" not found', details=k8s.V1StatusDetails(name=namespace, kind="namespaces"))
        key = self.store.key(resource.plural, namespace if resource.namespaced else None, meta.name)
        if key in self.store.objects:
            raise ApiError(
                409, f'{resource.plural} "{meta.name}" already exists', details=k8s.V1StatusDetails(name=meta.name, kind=resource.plural)
            )
        getattr(self, f"_check_{resource.plural}", lambda obj: None)(obj)
        meta.namespace = namespace if resource.namespaced else None
        meta.uid = str(uuid.uuid4())
        meta.resource_version = str(next(self._version))
        meta.creation_timestamp = _now()
        obj.metadata = meta
        if resource.plural == "persistentvolumeclaims":
            meta.finalizers = ["kubernetes.io/pvc-protection"]
            if obj.spec.storage_class_name is None:  # GKE's default StorageClass, set on admission
                obj.spec.storage_class_name = "standard-rwo"
            obj.status = k8s.V1PersistentVolumeClaimStatus(phase="Pending")
        elif resource.plural == "persistentvolumes":
            meta.finalizers = ["kubernetes.io/pv-protection"]
            obj.status = k8s.V1PersistentVolumeStatus(phase="Available", last_phase_transition_time=_now())
        elif resource.plural == "secrets" and obj.type is None:
            obj.type = "Opaque"
        elif resource.plural == "namespaces":
            meta.labels = {**(meta.labels or {}), "kubernetes.io/metadata.name": meta.name}
            obj.spec = k8s.V1NamespaceSpec(finalizers=["kubernetes"])
            obj.status = k8s.V1NamespaceStatus(phase="Active")
        self._put(resource.plural, obj)
        self._bind()
        return self._item(obj)

    def _check_persistentvolumeclaims(self, pvc: k8s.V1PersistentVolumeClaim) -> None:
        requests = ((pvc.spec.resources.requests if pvc.spec and pvc.spec.resources else None) or {})
        if "storage" not in requests:
            raise ApiError(
                422, f'PersistentVolumeClaim "{pvc.metadata.name}" is invalid: spec.resources[storage]: Required value'
            )
        if not (pvc.spec.access_modes or []):
            raise ApiError(
                422,
                f'PersistentVolumeClaim "{pvc.metadata.name}" is invalid: '
                "spec.accessModes: Required value: at least 1 access mode is required",
            )

    def _check_persistentvolumes(self, pv: k8s.V1PersistentVolume) -> None:
        spec = pv.spec
        if spec is None or "storage" not in (spec.capacity or {}):
            raise ApiError(422, f'PersistentVolume "{pv.metadata.name}" is invalid: spec.capacity: Required value')
        if not (spec.csi or spec.gce_persistent_disk or spec.host_path or spec.nfs or spec.local):
            raise ApiError(422, f'PersistentVolume "{pv.metadata.name}" is invalid: spec: Required value: must specify a volume type')
        if spec.csi and not (spec.csi.driver and spec.csi.volume_handle):
            raise ApiError(422, f'PersistentVolume "{pv.metadata.name}" is invalid: spec.csi.volumeHandle: Required value')

    def _bind(self) -> None:
        """The PV controller's static binding: a Pending claim naming a volume that is free
        (or pre-bound to it) is bound, both sides."""
        for (kind, ns, name), pvc in list(self.store.objects.items()):
            if kind != "persistentvolumeclaims" or pvc.status.phase != "Pending" or pvc.metadata.deletion_timestamp:
                continue
            pv = None
            if pvc.spec.volume_name:
                pv = self.store.objects.get(self.store.key("persistentvolumes", None, pvc.spec.volume_name))
            else:
                for (k, _, _), candidate in self.store.objects.items():
                    ref = candidate.spec.claim_ref if k == "persistentvolumes" else None
                    if ref and ref.namespace == ns and ref.name == name and not ref.uid:
                        pv = candidate
            if pv is None or pv.metadata.deletion_timestamp:
                continue
            ref = pv.spec.claim_ref
            if ref and not (ref.namespace == ns and ref.name == name and ref.uid in (None, pvc.metadata.uid)):
                continue
            if pv.status.phase not in ("Available", "Pending") and not (ref and ref.uid == pvc.metadata.uid):
                continue
            if (pv.spec.storage_class_name or "") != (pvc.spec.storage_class_name or ""):
                continue
            pv.spec.claim_ref = k8s.V1ObjectReference(
                api_version="v1", kind="PersistentVolumeClaim", namespace=ns, name=name,
                uid=pvc.metadata.uid, resource_version=pvc.metadata.resource_version,
            )
            pv.status = k8s.V1PersistentVolumeStatus(phase="Bound", last_phase_transition_time=_now())
            pv.metadata.resource_version = str(next(self._version))
            pvc.spec.volume_name = pv.metadata.name
            pvc.metadata.annotations = {**(pvc.metadata.annotations or {}), "pv.kubernetes.io/bind-completed": "yes"}
            pvc.status = k8s.V1PersistentVolumeClaimStatus(
                phase="Bound", access_modes=pv.spec.access_modes, capacity=dict(pv.spec.capacity)
            )
            pvc.metadata.resource_version = str(next(self._version))

    def _in_use(self, namespace: str, claim: str) -> bool:
        for (kind, ns, _), pod in self.store.objects.items():
            if kind != "pods" or ns != namespace or pod.status.phase in ("Succeeded", "Failed"):
                continue
            for volume in pod.spec.volumes or []:
                if volume.persistent_volume_claim and volume.persistent_volume_claim.claim_name == claim:
                    return True
        return False

    def _delete(self, resource: Resource, namespace: str | None, name: str) -> dict:
        obj = self._lookup(resource, namespace, name)
        key = self.store.key(resource.plural, namespace if resource.namespaced else None, name)
        if resource.plural == "secrets":
            del self.store.objects[key]
            done = k8s.V1Status(
                api_version="v1", kind="Status", metadata=k8s.V1ListMeta(), status="Success",
                details=k8s.V1StatusDetails(name=name, kind=resource.plural, uid=obj.metadata.uid),
            )
            return self._serializer.sanitize_for_serialization(done)
        # Claims and volumes carry protection finalizers: the answer is the object marked for
        # deletion; it goes once nothing holds it (here: at once, unless a pod uses the claim
        # or a claim still holds the volume).
        obj.metadata.deletion_timestamp = obj.metadata.deletion_timestamp or _now()
        obj.metadata.deletion_grace_period_seconds = 0
        obj.metadata.resource_version = str(next(self._version))
        answer = self._item(obj)
        if resource.plural == "persistentvolumeclaims":
            if not self._in_use(namespace, name):
                del self.store.objects[key]
                self._release(namespace, obj)
        else:
            ref = obj.spec.claim_ref
            held = ref and self.store.objects.get(self.store.key("persistentvolumeclaims", ref.namespace, ref.name))
            if not (held and held.metadata.uid == ref.uid):
                del self.store.objects[key]
        return answer

    def _release(self, namespace: str, pvc: k8s.V1PersistentVolumeClaim) -> None:
        pv_name = pvc.spec.volume_name
        pv = self.store.objects.get(self.store.key("persistentvolumes", None, pv_name)) if pv_name else None
        if pv is None or not pv.spec.claim_ref or pv.spec.claim_ref.uid != pvc.metadata.uid:
            return
        if pv.spec.persistent_volume_reclaim_policy == "Delete":
            del self.store.objects[self.store.key("persistentvolumes", None, pv_name)]
            if pv.spec.csi:
                self.deleted_disks.append(pv.spec.csi.volume_handle)
            elif pv.spec.gce_persistent_disk:
                self.deleted_disks.append(pv.spec.gce_persistent_disk.pd_name)
        else:
            pv.status = k8s.V1PersistentVolumeStatus(phase="Released", last_phase_transition_time=_now())
            pv.metadata.resource_version = str(next(self._version))
