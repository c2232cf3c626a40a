"""Typed results that one lifecycle stage hands to the next."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)


class ImageRef(_Result):
    """A built user environment, pinned by the digest of what went into it.

    For the ``venv`` builder the digest is the content hash of the build inputs
    and ``location`` is the environment's folder; OCI builders put the registry
    reference there.
    """

    name: str
    tag: str
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    builder: Literal["venv", "buildah", "podman", "docker"] = "venv"
    location: str
    repository: str | None = None

    @property
    def is_oci(self) -> bool:
        return self.builder != "venv"

    @property
    def pinned(self) -> str:
        return f"{self.repository or self.name}@{self.digest}"

    @property
    def python(self) -> Path:
        return Path(self.location) / "bin" / "python"

    @property
    def bin(self) -> Path:
        return Path(self.location) / "bin"


class BuildResult(_Result):
    image: ImageRef
    built: bool
    seconds: float


class LabSource(_Result):
    name: str
    path: Path
    content_hash: str


LabStatus = Literal["passed", "failed", "timeout", "error"]


class LabResult(_Result):
    lab: str
    status: LabStatus
    seconds: float
    failing_cell: int | None = None
    cell_excerpt: str | None = None
    error: str | None = None
    # The failing cell's traceback as core/labrunner.py keeps it: no ANSI colours, the last
    # frames, bounded in length.
    traceback: str | None = None
    cached: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def describe(self) -> str:
        if self.passed:
            return f"{self.lab}: passed in {self.seconds:.1f}s" + (" (cached)" if self.cached else "")
        where = f" in cell {self.failing_cell}" if self.failing_cell is not None else ""
        excerpt = f" [{self.cell_excerpt}]" if self.cell_excerpt else ""
        return f"{self.lab}: {self.status}{where}{excerpt}: {self.error}"

    def failure_lines(self) -> list[str]:
        """What a lab author reads in a terminal: the one-line description, then the
        traceback indented under it."""
        return [self.describe(), *(f"    {line}" for line in (self.traceback or "").splitlines())]

    def failure_markdown(self) -> list[str]:
        where = f"cell {self.failing_cell}" if self.failing_cell is not None else "no cell"
        lines = [f"### {self.lab}: {self.status} in {where}", ""]
        if self.cell_excerpt:
            lines += [f"first line: {_code(self.cell_excerpt)}", ""]
        body = self.traceback or self.error or ""
        fence = "`" * max(3, _longest_run(body, "`") + 1)
        return lines + [fence, body, fence]


class LabReport(_Result):
    image: ImageRef
    results: list[LabResult]
    seconds: float

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def failures(self) -> list[LabResult]:
        return [r for r in self.results if not r.passed]

    def markdown(self, site: str) -> str:
        """test-notebooks' artifact: a row per lab, then each failure with its traceback."""
        rows = [
            f"| {r.lab} | {r.status}{' (cached)' if r.cached else ''} | {r.seconds:.2f} | "
            + ("" if r.failing_cell is None else f"{r.failing_cell}: {_code(r.cell_excerpt or '')}")
            + f" | {_cell(r.error or '')} |"
            for r in self.results
        ]
        lines = [
            f"# test-notebooks: {site}: {'all passed' if self.passed else 'FAILED'}",
            "",
            f"image `{self.image.pinned}`, {self.seconds:.1f}s",
            "",
            "| lab | status | seconds | failing cell | error |",
            "|---|---|---|---|---|",
            *rows,
        ]
        for failure in self.failures:
            lines += ["", *failure.failure_markdown()]
        return "\n".join(lines)


def _longest_run(text: str, char: str) -> int:
    longest = run = 0
    for c in text:
        run = run + 1 if c == char else 0
        longest = max(longest, run)
    return longest


def _cell(text: str) -> str:
    """Text inside one markdown table cell: one line, no column break."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    """Inline code that survives backticks in the text (a cell's first line may hold some)."""
    ticks = "`" * (_longest_run(text, "`") + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{_cell(text)}{pad}{ticks}"


class Check(_Result):
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0
    planned: bool = False  # a dry run's "would be created", not yet there
    link: str | None = None  # a file that shows what was checked (the browser check's screenshot)


class ProvisionReport(_Result):
    site: str
    target: str
    checks: list[Check]
    outputs: dict[str, str] = {}  # what the next flows use: endpoint, static IP, registry (no secrets)
    kubeconfig: str | None = None  # a 0600 file, for the gke target

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


HubAction = Literal["start", "restart", "unchanged"]


class ResourceLimits(_Result):
    """Per user server; None means no limit."""

    memory: str | None = None  # "2G", "512M"
    cpu: float | None = None  # cores


class HubSpec(_Result):
    """What the hub should be, whatever it runs on; each target renders it
    (local: the JupyterHub config; gke: Zero-to-JupyterHub values)."""

    image: ImageRef
    authenticator: Literal["native", "shared-password", "lti"]
    admins: list[str]
    default_url: str
    start_timeout_seconds: int
    limits: ResourceLimits = ResourceLimits()
    cull_idle_seconds: int = 0  # 0: never stop idle servers
    labs: list[LabSource] = []


class HubPlan(_Result):
    """What applying a HubSpec would do, decided before anything changes."""

    action: HubAction
    config_hash: str
    url: str
    reason: str
    # What changes in the hub's settings, one line per setting, secrets never shown (where the target can tell).
    changes: list[str] = []


class HubState(_Result):
    """The hub as it is now: read from the target, not from a record."""

    running: bool
    url: str
    version: str | None = None
    image: ImageRef | None = None
    config_hash: str | None = None
    detail: str = ""


class HubAccess(_Result):
    """How olab reaches a hub's REST API: its URL and the olab service's token."""

    url: str
    token: SecretStr


class UserLogin(_Result):
    """How a browser reaches one user's server as that user: the hub's URL, the user's name
    and a short-lived token of theirs (made through the hub's API, deleted after use)."""

    hub_url: str
    user: str
    token: SecretStr

    def server_url(self, path: str = "") -> str:
        return f"{self.hub_url.rstrip('/')}/user/{quote(self.user)}/{path}"


class FailedRequest(_Result):
    url: str
    reason: str  # "404", or the browser's error ("net::ERR_CONNECTION_REFUSED")


class DashboardObservation(_Result):
    """What a student's browser showed of one page (a lab's dashboard, the lab index)."""

    requested: str
    landed: str  # the URL after redirects
    error: str | None = None  # why the page did not open (a timeout, a refused connection)
    title: str = ""
    requests: int = 0
    failed_requests: list[FailedRequest] = []
    # Requests to any host but the site's own: blocked, as a classroom network would.
    foreign_requests: list[str] = []
    console_errors: list[str] = []
    typeset_formulas: int = 0  # MathJax output elements (mjx-container)
    raw_formulas: list[str] = []  # `$...$` left as text in the rendered markdown
    widget_views: int = 0
    error_outputs: list[str] = []  # the last line of each traceback an output shows
    links: list[str] = []  # the page's links to dashboards (voila/render/...), absolute
    slider: str | None = None  # the label of the slider moved; None when the page has none
    slider_values: tuple[str, str] | None = None  # its value before and after the keys
    output_changed: bool | None = None  # None when no slider was moved
    screenshot: Path | None = None
    seconds: float = 0.0


class HubDeployment(_Result):
    """What runs for a site's hub after deploy-hub (how it runs is the target's business)."""

    url: str
    config_hash: str
    image: ImageRef
    started_at: datetime
    action: HubAction = "start"


class HealthReport(_Result):
    hub_url: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


class ReleaseResult(_Result):
    image: ImageRef
    labs: LabReport
    hub: HubDeployment
    health: HealthReport


class TeardownReport(_Result):
    site: str
    restore_point: str | None
    users: list[str]
    files: int
    bytes: int
    seconds: float
    dry_run: bool = False
    already_torn_down: bool = False
    pruned: list[str] = []


class UserRestore(_Result):
    user: str
    files: int
    bytes: int
    verified: bool


class RestoreReport(_Result):
    site: str
    restore_point: str | None
    users: list[UserRestore]
    hub: HubDeployment | None
    seconds: float
    note: str = ""


class RestorePointSummary(_Result):
    """What a restore point holds, in target-neutral terms."""

    id: str
    users: list[str]
    files: int
    bytes: int
    image: ImageRef | None = None


class DataFacts(_Result):
    """What a target holds of a site's data right now (for teardown's decisions)."""

    exists: bool
    users: list[str] = []
    files: int = 0
    bytes: int = 0
    where: str = ""
    # Where the target keeps restore points, and what releasing the runtime does, when they
    # differ from the local target's (a backups folder; deleting the runtime folder).
    kept_at: str | None = None
    release: str | None = None


StepVerb = Literal[
    "build", "reuse", "run", "skip", "start", "restart", "leave", "stop", "archive", "delete", "restore",
    "prepare", "check", "refuse", "prune", "finish", "create", "update", "replace",
]


class PlannedStep(_Result):
    verb: StepVerb
    subject: str
    detail: str = ""


class FlowPlan(_Result):
    """A dry run's answer: what a real run would do, step by step. Nothing was changed."""

    flow: str
    site: str
    steps: list[PlannedStep]

    def lines(self) -> list[str]:
        return [f"would {s.verb} {s.subject}" + (f": {s.detail}" if s.detail else "") for s in self.steps]

    def markdown(self) -> str:
        rows = [f"| {s.verb} | {s.subject} | {s.detail} |" for s in self.steps] or ["| (nothing) | | |"]
        return "\n".join(
            [f"# {self.flow}: {self.site} (dry run: nothing was changed)", "", "| would | what | detail |", "|---|---|---|", *rows]
        )


class InfraPlan(_Result):
    """What provisioning would change on a target, computed before anything changes.
    ``destructive``: it destroys or replaces something, so it waits for an approval."""

    target: str
    summary: str
    steps: list[PlannedStep]
    changes: bool = True
    destructive: bool = False
    # Approved in advance by the site file (the setting that says so), so nobody is waited for.
    approved_by: str | None = None


class RegistryLogin(_Result):
    """Credentials for an image registry (Artifact Registry: oauth2accesstoken and a short-lived token)."""

    username: str
    password: SecretStr


class RegistryAccess(_Result):
    """Where a site's images go, and how olab logs in there."""

    address: str  # host[:port][/path]
    insecure: bool = False  # plain HTTP: only a registry on loopback
    login: RegistryLogin | None = None

    @property
    def host(self) -> str:
        return self.address.split("/")[0]
