"""Typed site configuration: one YAML file per deployment in ``sites/``.

A site is validated as a whole before any flow touches anything; every
problem is reported as one line naming the file and the field path.
"""

from __future__ import annotations

import ipaddress
import os
import re
import zoneinfo
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

Port = Annotated[int, Field(ge=1, le=65535)]
Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")]
Username = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._@-]{0,63}$")]

_CRON_FIELD = re.compile(r"^[0-9*/,\-A-Za-z]+$")


class ConfigError(Exception):
    """A site that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(str, Enum):
    local = "local"
    gke = "gke"


HttpsUrl = Annotated[str, Field(pattern=r"^https://[^\s/?#]+[^\s?#]*$")]


class LtiSettings(_Section):
    """The course platform (an LTI 1.3 platform: Moodle, Canvas, ...) that logs students in.
    Its client id is a secret of the site's store (Vault: lti_client_id)."""

    issuer: HttpsUrl
    authorize_url: HttpsUrl
    jwks_endpoint: HttpsUrl
    # The launch claim that becomes the JupyterHub user name; admins are named by it too.
    username_key: str = "email"


class HubSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8000
    hub_api_port: Port = 8081
    proxy_api_port: Port = 8001
    admins: list[Username] = Field(default_factory=lambda: ["admin"], min_length=1)
    authenticator: Literal["shared-password", "lti"] = "shared-password"
    default_url: str = "/lab"
    start_timeout_seconds: Annotated[int, Field(ge=5, le=3600)] = 120
    # Per user server. The local target enforces them on containers (OCI images);
    # a venv image runs plain processes and refuses them.
    memory_limit: Annotated[str, Field(pattern=r"^[1-9][0-9]*[KMG]$")] | None = None
    cpu_limit: Annotated[float, Field(gt=0, le=64)] | None = None
    # A server idle this long is stopped (jupyterhub-idle-culler, as Zero-to-JupyterHub
    # runs it); its data stays. 0: never.
    cull_idle_seconds: Annotated[int, Field(ge=0, le=30 * 86400)] = 3600
    lti: LtiSettings | None = None

    @field_validator("default_url")
    @classmethod
    def _absolute_url_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be a path starting with '/', such as /lab")
        return value

    @model_validator(mode="after")
    def _lti_platform(self) -> HubSettings:
        if self.authenticator == "lti" and self.lti is None:
            raise ValueError("authenticator lti needs an lti section (issuer, authorize_url, jwks_endpoint)")
        return self

    @model_validator(mode="after")
    def _distinct_ports(self) -> HubSettings:
        ports = [self.port, self.hub_api_port, self.proxy_api_port]
        if len(set(ports)) != len(ports):
            raise ValueError("port, hub_api_port and proxy_api_port must differ")
        return self


Builder = Literal["auto", "venv", "buildah", "podman", "docker"]


class ImageSettings(_Section):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")] = "olab-user"
    context: Path = Path("images/olab-user")
    # auto: buildah (with podman to run) where installed, else docker, else a venv.
    builder: Builder = "auto"
    # The Containerfile's BASE_IMAGE; "debootstrap:<suite>" makes a Debian base
    # on this machine (for hosts that cannot pull from a public registry).
    base_image: str | None = None
    # Where OCI images are pushed; a loopback address is a registry olab runs.
    registry: Annotated[str, Field(pattern=r"^[a-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9._/-]+)?$")] = "127.0.0.1:5000"

    @field_validator("base_image")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        if value and value.startswith("debootstrap:") and not re.fullmatch(r"debootstrap:[a-z]+", value):
            raise ValueError(f"{value!r}: use debootstrap:<suite>, such as debootstrap:bookworm")
        return value

    @property
    def local_registry(self) -> bool:
        host = self.registry.split("/")[0].split(":")[0]
        return host in ("127.0.0.1", "localhost")


class LabSettings(_Section):
    path: Path = Path("labs")
    cell_timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 120
    parallelism: Annotated[int, Field(ge=0, le=64)] = 0
    health_check_lab: str = "lorenz"


class ScheduleSettings(_Section):
    timezone: str = "Europe/London"
    teardown: str = "0 19 * * 5"
    restore: str = "0 7 * * 1"

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r} (use an IANA name such as Europe/London)")
        return value

    @field_validator("teardown", "restore")
    @classmethod
    def _cron(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError(f"{value!r} is not a 5-field cron expression (minute hour day month weekday)")
        return value


class BackupSettings(_Section):
    path: Path | None = None
    keep: Annotated[int, Field(ge=1, le=1000)] = 4


class NodePool(_Section):
    machine_type: str = "e2-standard-2"
    min_nodes: Annotated[int, Field(ge=0)] = 0
    max_nodes: Annotated[int, Field(ge=1)] = 3
    preemptible: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> NodePool:
        if self.min_nodes > self.max_nodes:
            raise ValueError("min_nodes must not exceed max_nodes")
        return self


def _loopback_url(url: str) -> bool:
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class GoogleApis(_Section):
    """Where the Google APIs are: Google's own by default. Other endpoints serve
    Private Service Connect, or emulators on loopback (tests)."""

    container: Annotated[str, Field(pattern=r"^https?://")] | None = None
    storage: Annotated[str, Field(pattern=r"^https?://")] | None = None
    compute: Annotated[str, Field(pattern=r"^https?://")] | None = None
    # No credentials at all: only for endpoints on this machine's loopback.
    anonymous: bool = False

    @model_validator(mode="after")
    def _anonymous_only_on_loopback(self) -> GoogleApis:
        if self.anonymous:
            urls = [u for u in (self.container, self.storage, self.compute) if u]
            if not urls or not all(_loopback_url(u) for u in urls):
                raise ValueError("anonymous: only for API endpoints on loopback (emulators, tests)")
        return self


class ShutdownSettings(_Section):
    """The weekend shutdown of a gke site."""

    # scale-to-zero: user servers stopped, both pools set to 0 nodes, disks and cluster kept.
    # destroy: every disk snapshotted, then pools and cluster destroyed (the cluster fee stops too).
    mode: Literal["scale-to-zero", "destroy"] = "scale-to-zero"
    # A scheduled destroy runs with nobody to approve it: say so here, or it waits for approval.
    approve_destroy: bool = False


class Prices(_Section):
    """Hourly prices for the shutdown's cost artifact (from the provider's price list; not fetched)."""

    currency: str = "USD"
    cluster_hour: Annotated[float, Field(ge=0)] = 0.10
    node_hour: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"e2-standard-2": 0.067, "e2-standard-4": 0.134, "e2-highmem-2": 0.090}
    )


class GkeSettings(_Section):
    project: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")]
    region: Annotated[str, Field(pattern=r"^[a-z]+-[a-z]+[0-9]+$")]
    # A zonal cluster (the default, cheaper) in this zone; none: a regional cluster.
    zone: Annotated[str, Field(pattern=r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")] | None = None
    cluster_name: Slug = "olab"
    namespace: Slug = "olab"
    release_channel: Literal["RAPID", "REGULAR", "STABLE"] = "REGULAR"
    core_pool: NodePool = NodePool(min_nodes=1, max_nodes=1)
    user_pool: NodePool = NodePool()
    domains: list[str] = Field(min_length=1)
    # Where user images are pushed: the Artifact Registry repository terraform makes.
    registry: str
    registry_repository: Slug = "olab"
    terraform_state_bucket: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")]
    # Where in the bucket this site's state lives (default olab/<site name>).
    terraform_state_prefix: str | None = None
    # terraform or tofu (OpenTofu): either runs the same modules.
    terraform: Literal["terraform", "tofu"] = "terraform"
    terraform_module: Path = Path("terraform/gke")
    # A plan that destroys or replaces anything waits this long for an operator's approval.
    approval_timeout_seconds: Annotated[int, Field(ge=10, le=7 * 86400)] = 3600
    # How long provision-cluster waits for the cluster and its pools, polling GKE's API.
    cluster_ready_timeout_seconds: Annotated[int, Field(ge=10, le=7200)] = 1800
    poll_seconds: Annotated[float, Field(gt=0, le=60)] = 10
    apis: GoogleApis = GoogleApis()
    shutdown: ShutdownSettings = ShutdownSettings()
    prices: Prices = Prices()
    # Zero-to-JupyterHub, pinned; a mirror of the public chart repository may replace it.
    chart_repository: Annotated[str, Field(pattern=r"^https?://")] = "https://hub.jupyter.org/helm-chart/"
    chart_version: Annotated[str, Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+")] = "4.4.0"
    helm: str = "helm"  # the helm binary (name on PATH, or a path)
    helm_timeout_seconds: Annotated[int, Field(ge=30, le=7200)] = 900
    # The hub's URL (default https://<first domain>, behind the ManagedCertificate).
    hub_url: Annotated[str, Field(pattern=r"^https?://")] | None = None

    @property
    def url(self) -> str:
        return (self.hub_url or f"https://{self.domains[0]}").rstrip("/")

    @property
    def location(self) -> str:
        return self.zone or self.region

    @model_validator(mode="after")
    def _zone_in_region(self) -> GkeSettings:
        if self.zone and not self.zone.startswith(self.region + "-"):
            raise ValueError(f"zone {self.zone} is not in region {self.region}")
        return self


VaultPath = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$", max_length=512)]
DEFAULT_JWT_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class VaultSettings(_Section):
    """Where a gke site's secrets are and how olab logs in to Vault; holds no secret itself
    (tokens and secret_ids come from the environment or 0600 files)."""

    address: Annotated[str, Field(pattern=r"^https?://[^\s/]+/?$")]
    mount: VaultPath = "secret"
    path: VaultPath
    auth: Literal["token", "approle", "kubernetes", "jwt"] = "approle"
    # Where the auth method is enabled (auth/<auth_mount>); default: the method's name.
    auth_mount: VaultPath | None = None
    namespace: VaultPath | None = None
    # PEM bundle of the CA that signed Vault's certificate; default: the system's CAs.
    ca_bundle: Path | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 15.0
    # token: a 0600 file holding the token; default: env VAULT_TOKEN.
    token_file: Path | None = None
    # approle: the role_id is an identifier, not a secret (here, a 0600-or-not file, or env VAULT_ROLE_ID);
    # the secret_id comes from a 0600 file or env VAULT_SECRET_ID.
    role_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    # kubernetes / jwt: the role to log in as, and the file holding the JWT.
    role: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")] | None = None
    jwt_file: Path = DEFAULT_JWT_FILE

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> VaultSettings:
        if self.auth in ("kubernetes", "jwt") and not self.role:
            raise ValueError(f"auth {self.auth} needs a role")
        if self.role_id and self.role_id_file:
            raise ValueError("role_id and role_id_file: give one of them")
        misplaced = {
            "token_file": self.auth != "token" and self.token_file,
            "role_id": self.auth != "approle" and self.role_id,
            "role_id_file": self.auth != "approle" and self.role_id_file,
            "secret_id_file": self.auth != "approle" and self.secret_id_file,
            "role": self.auth not in ("kubernetes", "jwt") and self.role,
        }
        if wrong := [name for name, bad in misplaced.items() if bad]:
            raise ValueError(f"{', '.join(wrong)}: not used by auth {self.auth}")
        return self

    @property
    def where(self) -> str:
        return f"mount '{self.mount}', path '{self.path}'"

    @property
    def api_path(self) -> str:
        return f"{self.mount}/data/{self.path}"

    @property
    def login_mount(self) -> str:
        return self.auth_mount or self.auth


class SiteConfig(_Section):
    name: Slug
    target: Target = Target.local
    description: str = ""
    runtime_dir: Path | None = None
    hub: HubSettings = HubSettings()
    image: ImageSettings = ImageSettings()
    labs: LabSettings = LabSettings()
    schedules: ScheduleSettings = ScheduleSettings()
    backups: BackupSettings = BackupSettings()
    gke: GkeSettings | None = None
    vault: VaultSettings | None = None

    @model_validator(mode="after")
    def _target_sections(self) -> SiteConfig:
        if self.target is Target.gke and self.gke is None:
            raise ValueError("target gke needs a gke section")
        if self.target is Target.local:
            try:
                loopback = ipaddress.ip_address(self.hub.host).is_loopback
            except ValueError:
                loopback = self.hub.host == "localhost"
            if not loopback:
                raise ValueError(f"hub.host {self.hub.host!r}: the local hub listens on loopback only")
        return self


def olab_home() -> Path:
    """Where olab keeps per-site runtimes, built environments and caches."""
    return Path(os.environ.get("OLAB_HOME") or Path.home() / ".olab").expanduser().resolve()


class SitePaths(BaseModel):
    """Every directory and file a site owns on this machine, derived once."""

    model_config = ConfigDict(frozen=True)

    runtime: Path
    backups: Path
    store: Path

    @property
    def hub(self) -> Path:
        return self.runtime / "hub"

    @property
    def homes(self) -> Path:
        return self.runtime / "homes"

    @property
    def labs(self) -> Path:
        return self.runtime / "labs"

    @property
    def logs(self) -> Path:
        return self.runtime / "logs"

    @property
    def secrets(self) -> Path:
        return self.runtime / "secrets" / "secrets.json"

    @property
    def state(self) -> Path:
        return self.runtime / "state.json"

    @property
    def envs(self) -> Path:
        return self.store / "envs"

    @property
    def lab_cache(self) -> Path:
        return self.store / "lab-results"

    @property
    def containers(self) -> Path:
        return self.store / "containers"


class Site(BaseModel):
    """A validated site with its paths resolved against its project."""

    model_config = ConfigDict(frozen=True)

    config: SiteConfig
    source: Path
    project: Path

    @property
    def name(self) -> str:
        return self.config.name

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.project / path).resolve()

    @property
    def labs_dir(self) -> Path:
        return self.resolve(self.config.labs.path)

    @property
    def image_context(self) -> Path:
        return self.resolve(self.config.image.context)

    @property
    def paths(self) -> SitePaths:
        home = olab_home()
        runtime = (
            self.resolve(self.config.runtime_dir.expanduser())
            if self.config.runtime_dir
            else home / "sites" / self.name
        )
        backups = (
            self.resolve(self.config.backups.path.expanduser())
            if self.config.backups.path
            else home / "backups" / self.name
        )
        return SitePaths(runtime=runtime, backups=backups, store=home)

    @property
    def hub_url(self) -> str:
        return f"http://{self.config.hub.host}:{self.config.hub.port}"


def find_project(start: Path | None = None, *, honour_env: bool = True) -> Path:
    """The project whose ``sites/`` a bare site name refers to.

    ``OLAB_PROJECT`` wins; otherwise the nearest folder at or above ``start``
    (the working directory) holding both ``sites/`` and ``prefect.yaml``.
    """
    if honour_env and (env := os.environ.get("OLAB_PROJECT")):
        return Path(env).expanduser().resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "sites").is_dir() and (folder / "prefect.yaml").is_file():
            return folder
    raise ConfigError(
        [f"{here}: not inside an olab project (no sites/ and prefect.yaml here or above); cd into one or set OLAB_PROJECT"]
    )


def site_file(ref: str, project: Path | None = None) -> Path:
    """A site reference is a name in ``sites/`` or a path to a YAML file."""
    if ref.endswith((".yaml", ".yml")) or os.sep in ref:
        return Path(ref).expanduser().resolve()
    return find_project(project) / "sites" / f"{ref}.yaml"


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def parse_site(text: str, source: Path, project: Path) -> Site:
    """Validate a site file's text; raise ConfigError with one line per problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else str(source)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{where}: YAML syntax error: {problem}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the site file must be a mapping of fields, not {type(data).__name__}"])
    data.setdefault("name", source.stem)
    try:
        config = SiteConfig.model_validate(data)
    except ValidationError as exc:
        problems = [f"{source}: {_field_path(e['loc'])}: {_describe(e)}" for e in exc.errors()]
        raise ConfigError(problems) from None
    return Site(config=config, source=source, project=project)


def load_site(ref: str = "local", project: Path | None = None) -> Site:
    """Load and validate a site by name (``sites/<name>.yaml``) or path."""
    path = site_file(ref, project)
    if not path.is_file():
        folder = path.parent
        known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        hint = f" (sites here: {', '.join(known)})" if known else ""
        raise ConfigError([f"{path}: no such site file{hint}"])
    # Relative paths in a site file are relative to the project that holds it.
    try:
        owner = find_project(path.parent, honour_env=False)
    except ConfigError:
        owner = path.parent
    return parse_site(path.read_text(encoding="utf-8"), path, owner)
