"""A HubSpec rendered as Zero-to-JupyterHub values, and the values checked before helm runs.

The gke target deploys two Helm releases: the Zero-to-JupyterHub chart (pinned,
from its chart repository) and ``helm/olab-ingress`` (the GKE ManagedCertificate,
the Ingress on the static IP, their Frontend/BackendConfig). Each gets its values
as layers, later ones winning, exactly as ``helm -f a -f b -f c`` merges them:

1. base: ``helm/values/base.yaml`` (olab's choices for every site: pools, storage, culler, ...)
2. site: :func:`z2jh_values` (and :func:`ingress_values`), rendered from the site and its HubSpec
3. secrets: :func:`secrets_layer`, written to a 0600 file; never a ``--set``

:func:`validate_values` checks the merged layers against the chart's own
``values.schema.json`` over that version's defaults, plus olab's rules (no open
authenticator, the user image pinned by digest, requests within limits), one line
per problem naming the key path. Everything here is pure: no files, no helm.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from core import seen_at_once
from core.config import LtiSettings, Site
from core.models import HubSpec

# The chart as its maintainers publish it; a site may name a mirror (see chart_source).
Z2JH_CHART = "jupyterhub"
Z2JH_REPOSITORY = "https://hub.jupyter.org/helm-chart/"
# Release names in the site's namespace.
HUB_RELEASE = "olab"
INGRESS_RELEASE = "olab-ingress"
# Our chart's objects (certificate, ingress, frontend/backend configs) are named from this;
# the hub's proxy-public Service refers to the BackendConfig by it.
INGRESS_NAME = "olab-hub"
# The Zero-to-JupyterHub Service the ingress sends traffic to (fullnameOverride "").
PROXY_SERVICE = "proxy-public"
PROXY_SERVICE_PORT = 80

LTI13_CLASS = "ltiauthenticator.lti13.auth.LTI13Authenticator"
SHARED_PASSWORD_CLASS = "shared-password"
AUTHENTICATOR_CLASSES = {"lti": LTI13_CLASS, "shared-password": SHARED_PASSWORD_CLASS}
# What LTI13Authenticator needs to accept a launch (jupyterhub-ltiauthenticator 1.x).
LTI13_REQUIRED = ("issuer", "client_id", "authorize_url", "jwks_endpoint")
# SharedPasswordAuthenticator's own minimum lengths (JupyterHub 5).
USER_PASSWORD_MIN = 8
ADMIN_PASSWORD_MIN = 32
# Authenticators that let anyone in: the chart's default among them.
OPEN_AUTHENTICATORS = {None, "", "dummy", "null", "jupyterhub.auth.DummyAuthenticator", "dummyauthenticator.DummyAuthenticator"}

_DIGEST_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}@sha256:[0-9a-f]{64}$")


# The platform's endpoints are the site file's hub.lti section.
LtiPlatform = LtiSettings


def lti_launch_admin(authenticator, handler, authentication):
    """Who is an admin after an LTI 1.3 launch: the one rule both targets' hubs run, as
    JupyterHub's ``Authenticator.post_auth_hook`` (see :func:`lti_admin_hook_code`).

    A launch whose signed roles claim holds an Instructor or Administrator role of the
    course (membership) or of the institution makes its user an admin; any other launch
    makes them a plain user, so admin rights follow the latest launch (JupyterHub applies
    ``admin`` at each login whenever it is not None). The site's hub.admins stay admins.
    Only full role URIs count, not the spec's short names ("Instructor").

    Self-contained (no module names, no imports): its source is what the hub runs.
    """
    admin_roles = {
        "http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor",
        "http://purl.imsglobal.org/vocab/lis/v2/membership#Administrator",
        "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Instructor",
        "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Administrator",
    }
    # LTI13Authenticator puts the launch's verified claims in auth_state.
    claims = authentication.get("auth_state") or {}
    roles = claims.get("https://purl.imsglobal.org/spec/lti/claim/roles") if isinstance(claims, dict) else None
    launched_as_admin = isinstance(roles, list) and any(isinstance(role, str) and role in admin_roles for role in roles)
    authentication["admin"] = authentication["name"] in authenticator.admin_users or launched_as_admin
    return authentication


def lti_admin_hook_code() -> str:
    """The hub's code for the rule: :func:`lti_launch_admin`'s source, wired as the hook. The
    local hub reads it from its settings, the gke hub from ``hub.extraConfig``."""
    return inspect.getsource(lti_launch_admin) + f"\n\nc.Authenticator.post_auth_hook = {lti_launch_admin.__name__}\n"


def seen_at_once_code() -> str:
    """The gke hub's code for a started server seen as soon as it listens: core/seen_at_once.py's
    source, wrapping the chart's KubeSpawner (Zero-to-JupyterHub runs extraConfig after its own
    config, which names the spawner). The local hub runs the same source from its settings."""
    return inspect.getsource(seen_at_once) + "\n\nc.JupyterHub.spawner_class = seen_at_once(c.JupyterHub.spawner_class)\n"


def chart_source(site: Site) -> tuple[str, str, str]:
    """(chart, repository URL, version) of the site's Zero-to-JupyterHub release."""
    gke = _gke(site)
    # A site may name a mirror of the chart repository; the version is pinned either way.
    return Z2JH_CHART, gke.chart_repository, gke.chart_version


def z2jh_values(
    site: Site,
    spec: HubSpec,
    *,
    lti: LtiPlatform | None = None,
    base: Mapping | None = None,
    notebooks: Mapping[str, str] | None = None,
) -> dict:
    """The site layer of the Zero-to-JupyterHub values: what the site and its HubSpec ask for.

    ``lti``: the platform's endpoints when ``spec.authenticator`` is ``lti`` (default: the
    site file's hub.lti).
    ``notebooks``: the labs every student gets, file name -> .ipynb text (the lab index
    included); see :func:`labs_delivery`.
    ``base``: the layers below this one, read (never changed) so that a site's smaller
    limit also lowers a base guarantee: Kubernetes refuses a pod that requests more than
    its limit. No secrets here: those are :func:`secrets_layer`'s.
    """
    _gke(site)
    image = spec.image
    if not image.is_oci or not image.repository:
        raise ValueError(
            f"{site.source}: image {image.name}: the gke target runs OCI images from the site's registry "
            f"(gke.registry); this one is a {image.builder} environment at {image.location}"
        )
    if spec.authenticator not in AUTHENTICATOR_CLASSES:
        raise ValueError(f"{site.source}: hub.authenticator: {spec.authenticator} is not available on the gke target")

    config: dict[str, Any] = {
        "JupyterHub": {"authenticator_class": AUTHENTICATOR_CLASSES[spec.authenticator]},
        # The authenticator is the gate (an LMS launch, or the shared password).
        "Authenticator": {"admin_users": sorted(spec.admins), "allow_all": True},
    }
    # Each student's server seen as soon as it listens, not up to 5 s later.
    hub: dict[str, Any] = {"config": config, "extraConfig": {"olab-seen-at-once": seen_at_once_code()}}
    lti = lti or site.config.hub.lti
    if spec.authenticator == "lti":
        lti13: dict[str, Any] = {"uri_scheme": "https"}  # TLS ends at Google's load balancer
        if lti is not None:
            lti13.update(
                issuer=lti.issuer, authorize_url=lti.authorize_url,
                jwks_endpoint=lti.jwks_endpoint, username_key=lti.username_key,
            )
        config["LTI13Authenticator"] = lti13
        # Admin rights from the launch's roles (Zero-to-JupyterHub runs extraConfig after config).
        hub["extraConfig"]["olab-lti-admins"] = lti_admin_hook_code()

    singleuser: dict[str, Any] = {
        # name:tag@digest: the digest is what runs, the tag is for people reading it.
        "image": {"name": image.repository, "tag": f"{image.tag}@{image.digest}"},
        "defaultUrl": spec.default_url,
        "startTimeout": spec.start_timeout_seconds,
        "extraEnv": {"OLAB_SITE": site.name},
    }
    if notebooks:
        singleuser.update(labs_delivery(notebooks))
    below = base or {}
    if spec.limits.memory:
        memory: dict[str, Any] = {"limit": spec.limits.memory}
        guarantee = _get(below, "singleuser.memory.guarantee")
        if _lower(spec.limits.memory, guarantee, _bytes):
            memory["guarantee"] = spec.limits.memory
        singleuser["memory"] = memory
    if spec.limits.cpu:
        cpu: dict[str, Any] = {"limit": spec.limits.cpu}
        guarantee = _get(below, "singleuser.cpu.guarantee")
        if _lower(spec.limits.cpu, guarantee, _cores):
            cpu["guarantee"] = spec.limits.cpu
        singleuser["cpu"] = cpu

    if spec.cull_idle_seconds:
        cull: dict[str, Any] = {
            "enabled": True,
            "timeout": spec.cull_idle_seconds,
            "every": max(60, min(600, spec.cull_idle_seconds // 2)),
        }
    else:
        cull = {"enabled": False}

    return {
        "hub": hub,
        "proxy": {
            "service": {
                "annotations": {
                    # Google's load balancer reaches the proxy pods directly (container-native),
                    # with our chart's BackendConfig (health check, websocket timeout).
                    "cloud.google.com/neg": '{"ingress": true}',
                    "cloud.google.com/backend-config": '{"default": "%s"}' % INGRESS_NAME,
                }
            }
        },
        "singleuser": singleuser,
        "cull": cull,
    }


# Where the labs sit, read-only, in every student's pod (from the chart's singleuser Secret).
LABS_MOUNT = "/srv/olab/labs"
LAB_INDEX = "index.ipynb"
# Helm keeps a release's values in one Secret and Kubernetes caps a Secret at 1 MiB; the
# chart's singleuser Secret holds the labs again. What is left for notebooks, with room for
# the rest of the values.
LABS_MAX_BYTES = 700_000
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def labs_delivery(notebooks: Mapping[str, str]) -> dict:
    """How a gke site's labs reach each student (singleuser values, pure): each notebook is a
    file of the chart's singleuser Secret mounted under LABS_MOUNT, and when a server starts
    its postStart hook copies the ones the student lacks into ~/labs, as the local target's
    hub does: a student's copy is never overwritten, the lab index always is (it is olab's
    page, not student work). Raises ValueError (one line) for a name Kubernetes cannot key
    or labs too large to travel in a Helm release."""
    bad = sorted(name for name in notebooks if not _SECRET_KEY.match(name) or not name.endswith(".ipynb"))
    if bad:
        raise ValueError(
            f"labs: {', '.join(bad)}: a gke site's lab file names may use only letters, digits, '-', '_' and '.'"
        )
    size = sum(len(text.encode()) for text in notebooks.values())
    if size > LABS_MAX_BYTES:
        raise ValueError(
            f"labs: {size:,} bytes of notebooks; a gke site's labs travel in its Helm release, which "
            f"Kubernetes caps at 1 MiB: keep them under {LABS_MAX_BYTES:,} bytes (no outputs, no embedded images)"
        )
    files = {
        f"lab-{name}": {"mountPath": f"{LABS_MOUNT}/{name}", "stringData": text, "mode": 0o644}
        for name, text in sorted(notebooks.items())
    }
    copy_in = (
        'mkdir -p "$HOME/labs" && for f in ' + LABS_MOUNT + '/*.ipynb; do n="${f##*/}"; '
        f'if [ "$n" = {LAB_INDEX} ]; then cp --remove-destination "$f" "$HOME/labs/$n"; '
        'else cp -n "$f" "$HOME/labs/$n"; fi; done'
    )
    return {
        "extraFiles": files,
        "lifecycleHooks": {"postStart": {"exec": {"command": ["sh", "-c", copy_in]}}},
    }


def ingress_values(site: Site, *, static_ip_name: str) -> dict:
    """The site layer of ``helm/olab-ingress``: the site's domains on provision-cluster's static IP."""
    gke = _gke(site)
    if not static_ip_name:
        raise ValueError(f"{site.source}: no static IP name: run provision-cluster first (its output static_ip_name)")
    return {
        "name": INGRESS_NAME,
        "domains": list(gke.domains),
        "staticIpName": static_ip_name,
        "service": {"name": PROXY_SERVICE, "port": PROXY_SERVICE_PORT},
    }


def secrets_layer(
    spec: HubSpec,
    secrets: Mapping[str, str],
    *,
    lti_client_ids: list[str] | None = None,
) -> dict:
    """The secrets layer: values only a 0600 file (or the cluster) may hold.

    ``secrets``: the site's secret store as plain strings (``cookie_secret``,
    ``proxy_auth_token``, ``api_token``, and for shared-password logins ``user_password``,
    ``admin_password``). ``lti_client_ids``: the LMS registration's client id(s).
    """
    config: dict[str, Any] = {}
    hub: dict[str, Any] = {"config": config}
    if secrets.get("cookie_secret"):
        config.setdefault("JupyterHub", {})["cookie_secret"] = secrets["cookie_secret"]
    if secrets.get("proxy_auth_token"):
        config["ConfigurableHTTPProxy"] = {"auth_token": secrets["proxy_auth_token"]}
    if secrets.get("api_token"):
        # olab's own service: how olab reaches the hub's REST API (its role is in the base layer).
        hub["services"] = {"olab": {"apiToken": secrets["api_token"]}}
    if spec.authenticator == "lti" and lti_client_ids:
        config["LTI13Authenticator"] = {"client_id": sorted(set(lti_client_ids))}
    if spec.authenticator == "shared-password":
        shared = {key: secrets[key] for key in ("user_password", "admin_password") if secrets.get(key)}
        if shared:
            config["SharedPasswordAuthenticator"] = shared
    return {"hub": hub}


def merge_values(*layers: Mapping | None) -> dict:
    """Layers merged as helm merges ``-f`` files: later wins, maps merge key by key,
    anything else (lists included) is replaced whole; a null is kept (it removes the
    chart's default later, see :func:`with_defaults`). The inputs are not changed."""
    merged: dict = {}
    for layer in layers:
        if layer:
            _merge_into(merged, layer)
    return merged


def with_defaults(values: Mapping, defaults: Mapping) -> dict:
    """The values over the chart's defaults, as helm coalesces them before its schema
    check: a null given for a key the defaults have removes that key."""
    out = copy.deepcopy(dict(defaults))
    for key, value in values.items():
        if value is None:
            if key in out:
                del out[key]
            else:
                out[key] = None
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = with_defaults(value, out[key])
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate_values(values: Mapping, schema: Mapping, defaults: Mapping) -> list[str]:
    """Problems with merged values, one line each, naming the key path; [] if none.

    The values are checked over ``defaults`` (the chart version's values.yaml) against
    ``schema`` (its values.schema.json), as helm does, and then against olab's rules.
    No line quotes a value (values may be secrets), only keys, types and the schema's words.
    """
    problems = schema_problems(values, schema, defaults)
    problems.extend(_olab_rules(with_defaults(values, defaults)))
    return list(dict.fromkeys(problems))


def schema_problems(values: Mapping, schema: Mapping, defaults: Mapping) -> list[str]:
    """Only the chart's schema check (as helm runs it), one line per problem: for any chart."""
    import jsonschema

    full = with_defaults(values, defaults)
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    validator = validator_class(schema)
    problems: list[str] = []
    for error in sorted(validator.iter_errors(full), key=lambda e: [str(p) for p in e.absolute_path]):
        problems.extend(_describe(error))
    return list(dict.fromkeys(problems))


# --- olab's rules over the merged values ---------------------------------------------------


def _olab_rules(values: Mapping) -> list[str]:
    problems: list[str] = []
    authenticator = _get(values, "hub.config.JupyterHub.authenticator_class")
    if authenticator in OPEN_AUTHENTICATORS or not isinstance(authenticator, str):
        problems.append(
            "hub.config.JupyterHub.authenticator_class: "
            + (f"{authenticator} lets anyone in" if authenticator else "not set")
            + "; the site's hub.authenticator chooses lti or shared-password"
        )
    elif authenticator in (LTI13_CLASS, "lti13", "ltiauthenticator.LTI13Authenticator"):
        lti = _get(values, "hub.config.LTI13Authenticator") or {}
        for key in LTI13_REQUIRED:
            if not lti.get(key):
                where = "the secrets layer" if key == "client_id" else "the LTI platform's settings"
                problems.append(f"hub.config.LTI13Authenticator.{key}: required for LTI 1.3 logins (from {where})")
        for key in ("authorize_url", "jwks_endpoint"):
            if lti.get(key) and not str(lti[key]).startswith("https://"):
                problems.append(f"hub.config.LTI13Authenticator.{key}: must be an https:// URL")
    elif authenticator == SHARED_PASSWORD_CLASS or authenticator.endswith("SharedPasswordAuthenticator"):
        shared = _get(values, "hub.config.SharedPasswordAuthenticator") or {}
        user, admin = shared.get("user_password"), shared.get("admin_password")
        if not user or len(str(user)) < USER_PASSWORD_MIN:
            problems.append(
                f"hub.config.SharedPasswordAuthenticator.user_password: required, at least {USER_PASSWORD_MIN} "
                "characters (from the secrets layer)"
            )
        if admin and len(str(admin)) < ADMIN_PASSWORD_MIN:
            problems.append(
                f"hub.config.SharedPasswordAuthenticator.admin_password: at least {ADMIN_PASSWORD_MIN} characters"
            )

    # JupyterHub refuses to start with a role granted to a service it does not have.
    services = _get(values, "hub.services") or {}
    for role, spec in sorted((_get(values, "hub.loadRoles") or {}).items()):
        for service in (spec or {}).get("services") or []:
            if service not in services:
                problems.append(
                    f"hub.loadRoles.{role}.services: {service} is not in hub.services "
                    "(its apiToken comes from the secrets layer)"
                )

    tag = _get(values, "singleuser.image.tag")
    if not isinstance(tag, str) or not _DIGEST_TAG.match(tag):
        problems.append("singleuser.image.tag: the user image must be pinned by digest (<tag>@sha256:<64 hex>)")

    for what, parse in (("memory", _bytes), ("cpu", _cores)):
        limit = _get(values, f"singleuser.{what}.limit")
        guarantee = _get(values, f"singleuser.{what}.guarantee")
        if _lower(limit, guarantee, parse):
            problems.append(
                f"singleuser.{what}.guarantee: {guarantee} exceeds singleuser.{what}.limit {limit} "
                "(Kubernetes refuses such a pod)"
            )
    return problems


# --- helpers ---------------------------------------------------------------------------------


def _gke(site: Site):
    if site.config.gke is None:
        raise ValueError(f"{site.source}: Zero-to-JupyterHub values are for gke sites; this one has no gke section")
    return site.config.gke


def _merge_into(target: dict, layer: Mapping) -> None:
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        elif isinstance(value, Mapping):
            target[key] = {}
            _merge_into(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _get(values: Mapping, dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)B?$")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _bytes(value: Any) -> float | None:
    """KubeSpawner's memory sizes (1K = 1024, as JupyterHub's ByteSpecification)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _SIZE.match(str(value).strip()) if value is not None else None
    return float(match.group(1)) * _UNITS[match.group(2)] if match else None


def _cores(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip() if value is not None else ""
    if re.fullmatch(r"[0-9]+m", text):
        return int(text[:-1]) / 1000
    try:
        return float(text)
    except ValueError:
        return None


def _lower(limit: Any, guarantee: Any, parse) -> bool:
    """Whether a limit is below a guarantee (False when either is unset or unreadable)."""
    lim, req = parse(limit), parse(guarantee)
    return lim is not None and req is not None and lim < req


def _path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _typename(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _describe(error) -> list[str]:
    where = _path(error.absolute_path)
    kind = error.validator
    if kind == "additionalProperties" and isinstance(error.instance, Mapping):
        schema = error.schema
        known = list(schema.get("properties", {}))
        patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
        lines = []
        for key in error.instance:
            if key in known or any(p.search(key) for p in patterns):
                continue
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            lines.append(f"{_path([*error.absolute_path, key])}: unknown key{suggestion}")
        return lines or [f"{where or '(top level)'}: unknown keys"]
    if kind == "required" and isinstance(error.instance, Mapping):
        return [
            f"{_path([*error.absolute_path, key])}: required"
            for key in error.validator_value
            if key not in error.instance
        ]
    if kind == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return [f"{where or '(top level)'}: must be {' or '.join(map(str, wanted))}, not {_typename(error.instance)}"]
    if kind == "enum":
        return [f"{where or '(top level)'}: must be one of {', '.join(repr(v) for v in error.validator_value)}"]
    if kind == "const":
        return [f"{where or '(top level)'}: must be {error.validator_value!r}"]
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "minLength", "maxLength"):
        return [f"{where or '(top level)'}: fails {kind} {error.validator_value}"]
    if kind == "pattern":
        return [f"{where or '(top level)'}: does not match {error.validator_value}"]
    if kind in ("oneOf", "anyOf"):
        return [f"{where or '(top level)'}: matches none of the allowed forms ({kind})"]
    return [f"{where or '(top level)'}: fails the chart's schema ({kind})"]


def _leaves(values: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(_leaves(value, path))
        else:
            out[path] = value
    return out


def _shown(value: Any, longest: int = 120) -> str:
    """A value as a diff line shows it: a long text (a lab notebook) by its size and digest."""
    text = json.dumps(value, default=str)
    if len(text) <= longest:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"<{len(text):,} characters, sha256 {digest}>"


def values_diff(old: Mapping, new: Mapping, secret: Mapping, limit: int = 200) -> list[str]:
    """What a deploy changes in a release's values, one line per key path (pure). Paths of
    the secrets layer say only that a secret changed, never its value."""
    before, after, hidden = _leaves(old), _leaves(new), set(_leaves(secret))
    lines = []
    for path in sorted(before.keys() | after.keys()):
        if before.get(path) == after.get(path) and (path in before) == (path in after):
            continue
        if path in hidden or any(path.startswith(h + ".") for h in hidden):
            what = "added" if path not in before else "removed" if path not in after else "changed"
            lines.append(f"`{path}`: secret {what}")
        elif path not in before:
            lines.append(f"`{path}`: added `{_shown(after[path])}`")
        elif path not in after:
            lines.append(f"`{path}`: removed (was `{_shown(before[path])}`)")
        else:
            lines.append(f"`{path}`: `{_shown(before[path])}` -> `{_shown(after[path])}`")
    return lines if len(lines) <= limit else [*lines[:limit], f"... and {len(lines) - limit} more"]
