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
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Numbers and booleans in a site file are strict: `port: "8000"` or `port: true` is
# refused, not converted (an int is still accepted where a float is wanted), and
# floats must be finite (.inf, .nan are refused).
Port = Annotated[int, Field(ge=1, le=65535, strict=True)]
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


_PLATFORM_URL = re.compile(r"^https?://[^\s/?#]+[^\s?#]*$")


def _platform_url(value: str) -> str:
    # http:// only for a platform on this machine (a test, a dev Moodle): on any other host
    # its keys and launches would cross the network in clear. The gke target refuses even
    # that (SiteConfig): its platform reaches the hub from outside.
    if not _PLATFORM_URL.match(value):
        raise ValueError(f"{_shown(value)} is not an https:// URL (no query or fragment)")
    if value.startswith("http://") and not _loopback_url(value):
        raise ValueError(f"{_shown(value)}: use https:// (http:// only on the local target, for a course platform on this machine's loopback)")
    return value


PlatformUrl = Annotated[str, AfterValidator(_platform_url)]


class LtiSettings(_Section):
    """The course platform (an LTI 1.3 platform: Moodle, Canvas, ...) that logs students in.
    Its client id is a secret of the site's store (`olab secrets init --lti-client-id`: on
    the local target the 0600 store, on gke Vault; key lti_client_id)."""

    issuer: PlatformUrl
    authorize_url: PlatformUrl
    jwks_endpoint: PlatformUrl
    # The launch claim that becomes the JupyterHub user name; admins are named by it too.
    username_key: str = "email"


class HubSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8000
    hub_api_port: Port = 8081
    proxy_api_port: Port = 8001
    admins: list[Username] = Field(default_factory=lambda: ["admin"], min_length=1)
    # native: students sign up and an admin approves each (the local target); lti: logins from
    # the course platform (LTI 1.3; both targets); shared-password: one person, a demo.
    # None: the target's own (native on local, shared-password on gke, as before).
    authenticator: Literal["native", "shared-password", "lti"] | None = None
    # Where a student lands after login: the lab index, each lab a dashboard from there.
    default_url: str = "/voila/render/labs/index.ipynb"
    start_timeout_seconds: Annotated[int, Field(ge=5, le=3600, strict=True)] = 120
    # Per user server. The local target enforces them on containers (OCI images);
    # a venv image runs plain processes and refuses them.
    memory_limit: Annotated[str, Field(pattern=r"^[1-9][0-9]*[KMG]$")] | None = None
    cpu_limit: Annotated[float, Field(gt=0, le=64, strict=True, allow_inf_nan=False)] | None = None
    # A server idle this long is stopped (jupyterhub-idle-culler, as Zero-to-JupyterHub
    # runs it); its data stays. 0: never.
    cull_idle_seconds: Annotated[int, Field(ge=0, le=30 * 86400, strict=True)] = 3600
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
    cell_timeout_seconds: Annotated[int, Field(ge=1, le=3600, strict=True)] = 120
    parallelism: Annotated[int, Field(ge=0, le=64, strict=True)] = 0
    health_check_lab: str = "lorenz"
    # The health check's look at the lab in a browser (Debian's chromium, from ./setup.sh); off
    # only where no browser can run, and the health report then says it was off.
    browser_check: Annotated[bool, Field(strict=True)] = True


CRON_HORIZON_YEARS = 5


def _prefect_schedule_problem(cron: str, timezone: str) -> str | None:
    """Why Prefect cannot schedule ``cron`` in ``timezone``, or None.

    The check is Prefect's own: its client-side ``CronSchedule`` model (what ``olab serve``
    builds from the site's schedules) validates the expression and the timezone, and the
    croniter Prefect vendors (what its scheduler iterates, ``day_or`` as CronSchedule's
    default) must find a date within CRON_HORIZON_YEARS: ``0 0 31 2 *`` parses but never fires.
    Importing Prefect takes about two seconds, paid once per process, only when a site file
    sets a schedule or timezone.
    """
    from datetime import datetime

    from prefect._vendor.croniter import CroniterError, croniter
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        reasons = [_describe(e) for e in exc.errors()]
        try:  # CronSchedule says only "Invalid cron string"; croniter says why.
            croniter(cron)
        except CroniterError as why:
            reasons.append(str(why))
        return "; ".join(reasons)
    start = datetime.now(zoneinfo.ZoneInfo(timezone)).replace(tzinfo=None)
    try:
        croniter(cron, start, day_or=True, max_years_between_matches=CRON_HORIZON_YEARS).get_next(datetime)
    except CroniterError:
        return f"never fires (no date in the next {CRON_HORIZON_YEARS} years)"
    return None


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
        # Prefect's schedules know fewer names than zoneinfo (posixrules, localtime, ...).
        if _prefect_schedule_problem("0 0 * * *", value):
            raise ValueError(f"unknown timezone {value!r} to Prefect's schedules (use an IANA name such as Europe/London)")
        return value

    @field_validator("teardown", "restore")
    @classmethod
    def _cron(cls, value: str, info: ValidationInfo) -> str:
        # Five fields, as olab's docs and prefect.yaml write them; Prefect's parser would also
        # take 6 or 7 (seconds, years), which a site's weekly schedule does not mean.
        fields = value.split()
        if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError(f"{value!r} is not a 5-field cron expression (minute hour day month weekday)")
        # A timezone that failed its own check is reported there; UTC stands in here.
        problem = _prefect_schedule_problem(value, info.data.get("timezone", "UTC"))
        if problem:
            raise ValueError(f"{value!r}: {problem}")
        return value


class BackupSettings(_Section):
    path: Path | None = None
    keep: Annotated[int, Field(ge=1, le=1000, strict=True)] = 4


class NodePool(_Section):
    machine_type: str = "e2-standard-2"
    min_nodes: Annotated[int, Field(ge=0, strict=True)] = 0
    max_nodes: Annotated[int, Field(ge=1, strict=True)] = 3
    preemptible: StrictBool = False

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
    anonymous: StrictBool = False

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
    approve_destroy: StrictBool = False
    # How long the snapshots of every disk may take to be READY (destroy mode).
    snapshot_timeout_seconds: Annotated[int, Field(ge=60, le=86400, strict=True)] = 3600


class Prices(_Section):
    """Hourly prices for the shutdown's cost artifact (from the provider's price list; not fetched)."""

    currency: str = "USD"
    cluster_hour: Annotated[float, Field(ge=0, strict=True, allow_inf_nan=False)] = 0.10
    node_hour: dict[str, Annotated[float, Field(ge=0, strict=True, allow_inf_nan=False)]] = Field(
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
    approval_timeout_seconds: Annotated[int, Field(ge=10, le=7 * 86400, strict=True)] = 3600
    # How long provision-cluster waits for the cluster and its pools, polling GKE's API.
    cluster_ready_timeout_seconds: Annotated[int, Field(ge=10, le=7200, strict=True)] = 1800
    poll_seconds: Annotated[float, Field(gt=0, le=60, strict=True, allow_inf_nan=False)] = 10
    apis: GoogleApis = GoogleApis()
    shutdown: ShutdownSettings = ShutdownSettings()
    prices: Prices = Prices()
    # Zero-to-JupyterHub, pinned; a mirror of the public chart repository may replace it.
    chart_repository: Annotated[str, Field(pattern=r"^https?://")] = "https://hub.jupyter.org/helm-chart/"
    chart_version: Annotated[str, Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+")] = "4.4.0"
    helm: str = "helm"  # the helm binary (name on PATH, or a path)
    helm_timeout_seconds: Annotated[int, Field(ge=30, le=7200, strict=True)] = 900
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
    timeout_seconds: Annotated[float, Field(gt=0, le=300, strict=True, allow_inf_nan=False)] = 15.0
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
        runnable = AUTHENTICATORS[self.target]
        if self.hub.authenticator is None:
            object.__setattr__(self.hub, "authenticator", runnable[0])
        elif self.hub.authenticator not in runnable:
            raise ValueError(
                f"hub.authenticator {self.hub.authenticator}: the {self.target.value} target runs "
                f"{', '.join(runnable[:-1])} or {runnable[-1]}"
            )
        if self.target is Target.gke and self.hub.lti is not None:
            for key in ("issuer", "authorize_url", "jwks_endpoint"):
                url = getattr(self.hub.lti, key)
                if not url.startswith("https://"):
                    raise ValueError(
                        f"hub.lti.{key} {_shown(url)}: the gke target's course platform must be https:// "
                        "(http:// on loopback is for the local target)"
                    )
        if self.target is Target.local:
            try:
                loopback = ipaddress.ip_address(self.hub.host).is_loopback
            except ValueError:
                loopback = self.hub.host == "localhost"
            if not loopback:
                raise ValueError(f"hub.host {self.hub.host!r}: the local hub listens on loopback only")
        return self


# What each target can run, its default first.
AUTHENTICATORS = {
    Target.local: ("native", "shared-password", "lti"),
    Target.gke: ("shared-password", "lti"),
}


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


def _shown(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _yaml_kind(value: object) -> str:
    """How a value read from YAML looks to the person who wrote it."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {_shown(value)}"
    if isinstance(value, str):
        return f"the string {_shown(value)}"
    if value is None:
        return "null (an empty value)"
    return f"a {type(value).__name__}"


def _describe(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    # Strict numbers and booleans: say what was given (`port: "8000"`, `port: true`).
    if error["type"] in ("int_type", "float_type", "bool_type") and "input" in error:
        message += f", not {_yaml_kind(error['input'])}"
    return message


# Limits no real site file comes near (the shipped ones are ~2 kB and 3 levels deep). They
# keep a malformed or hostile file from eating time, memory or the stack: PyYAML is pure
# Python here (its C loader cannot be hooked) and composes about 50 kB/s of dense flow
# lists, so MAX_SITE_BYTES bounds the time to read any file to a few seconds.
MAX_SITE_BYTES = 128 * 1024
MAX_NESTING = 64
MAX_INT_DIGITS = 20  # beyond 64-bit integers; every integer field is far below that

_STR_TAG = "tag:yaml.org,2002:str"
_INT_TAG = "tag:yaml.org,2002:int"


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a site file may not use (an alias, nesting past MAX_NESTING)."""


class _SiteLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases and nesting deeper than MAX_NESTING.

    Aliases are refused outright: a site file has no use for them, and a "billion laughs"
    file is made of them. The depth is checked as each collection starts, before
    PyYAML's composer (which recurses once per level) could reach Python's recursion limit.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(
                None, None, f"alias *{event.anchor}: aliases are not allowed in a site file (write the value out)", event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > MAX_NESTING and isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                raise _Refused(None, None, f"nested more than {MAX_NESTING} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _node_problems(root: yaml.Node, loader: _SiteLoader, source: Path) -> list[str]:
    """What is wrong in a composed YAML document, one line each, in file order: keys that
    are not strings, keys given twice in one mapping, integers too long to be meant, and
    scalars PyYAML cannot turn into values (``2024-02-30``, ``!!int abc``). Walks the nodes
    with its own stack, not recursion. Scalars are constructed here, so that a failure is
    reported with its field; what is constructed is kept for construct_document."""
    found: list[tuple[int, str]] = []

    def problem(node: yaml.Node, loc: tuple, text: str) -> None:
        line = node.start_mark.line + 1
        found.append((line, f"{source}:{line}: {_field_path(loc)}: {text}"))

    stack: list[tuple[yaml.Node, tuple]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):
                    problem(key, loc, f"a {key.id} as a key is not a field name: keys must be strings")
                    continue
                if key.tag != _STR_TAG:
                    kind = key.tag.rsplit(":", 1)[-1]
                    problem(key, loc, f"key {_shown(key.value)} (YAML {kind}) is not a field name: keys must be strings")
                    continue
                line = key.start_mark.line + 1
                if key.value in first_line:
                    lines = f"lines {first_line[key.value]} and {line}" if first_line[key.value] != line else f"twice on line {line}"
                    problem(key, loc + (key.value,), f"duplicated key {_shown(key.value)} ({lines}): give it once")
                    continue
                first_line[key.value] = line
                stack.append((value, loc + (key.value,)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, loc + (i,)) for i, item in enumerate(node.value))
        elif node.tag != _STR_TAG:
            if node.tag == _INT_TAG:
                digits = node.value.strip().lstrip("+-").replace("_", "").replace(":", "")
                if digits[:2].lower() in ("0x", "0o", "0b"):
                    digits = digits[2:]
                if len(digits) > MAX_INT_DIGITS:
                    problem(node, loc, f"an integer of {len(digits)} digits is too large for any field")
                    continue
            try:
                loader.construct_object(node)
            except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
                reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                problem(node, loc, f"{_shown(node.value)} is not a valid YAML {node.tag.rsplit(':', 1)[-1]}: {reason}")
    return [text for _, text in sorted(found, key=lambda item: item[0])]


def _read_yaml(text: str, source: Path) -> object:
    """The document in ``text``, or ConfigError with one line per problem."""
    loader = None
    try:
        loader = _SiteLoader(text)  # PyYAML's reader checks every character here
        root = loader.get_single_node()
        if root is None:
            return None
        if problems := _node_problems(root, loader, source):
            raise ConfigError(problems)
        return loader.construct_document(root)
    except _Refused as exc:
        mark = exc.problem_mark
        raise ConfigError([f"{source}:{mark.line + 1}:{mark.column + 1}: {exc.problem}"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else str(source)
        problem = exc.problem or str(exc).splitlines()[0]
        if exc.problem and exc.context:  # "but found another document" needs its context
            problem += f" ({exc.context})"
        # A constructor's error (an unknown !tag on a mapping) is not one of syntax.
        label = "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise ConfigError([f"{where}: {label}: {problem}"]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            [f"{source}:{line}: character #x{exc.character:04x} (character {exc.position} of the file) is not allowed in YAML"]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: YAML error: {str(exc).splitlines()[0]}"]) from None
    except RecursionError:  # not expected past the composer's depth check; one line if ever
        raise ConfigError([f"{source}: nested too deeply to read"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_site(text: str | bytes, source: Path, project: Path) -> Site:
    """Validate a site file's content; raise ConfigError with one line per problem.

    Bytes are decoded as strict UTF-8 here. Each line names ``source`` and where: a line
    (and column) for what is wrong in the YAML itself, a field path for what the site
    models refuse.
    """
    if len(text) > MAX_SITE_BYTES:
        unit = "bytes" if isinstance(text, bytes) else "characters"
        raise ConfigError([f"{source}: more than {MAX_SITE_BYTES} {unit}; a site file is at most {MAX_SITE_BYTES} {unit}"])
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = text.count(b"\n", 0, exc.start) + 1
            raise ConfigError(
                [f"{source}:{line}: not UTF-8: byte 0x{text[exc.start]:02x} at byte offset {exc.start} ({exc.reason}); save the file as UTF-8"]
            ) from None
    data = _read_yaml(text, source)
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
    try:
        with path.open("rb") as handle:
            content = handle.read(MAX_SITE_BYTES + 1)  # one byte more: too long is reported
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the site file: {exc.strerror or exc}"]) from None
    return parse_site(content, path, owner)
