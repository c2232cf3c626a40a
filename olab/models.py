"""Typed results that one lifecycle stage hands to the next."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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


class Check(_Result):
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0


class ProvisionReport(_Result):
    site: str
    target: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


HubAction = Literal["start", "restart", "unchanged"]


class HubDeployment(_Result):
    """What runs for a site's hub after deploy-hub."""

    url: str
    pid: int
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
