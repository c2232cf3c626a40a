"""Restore points: what a teardown saved, and which one a restore may use.

A restore point is a folder under the site's backup location:

    rp-20261129T190000Z-1a2b3c/
        users/<name>.tar      one archive per user home (plain tar)
        hub.tar.enc           the hub database, the secret store, the site state:
                              tar, encrypted with AES-256-GCM (core.sealing)
        manifest.json         every file: path, type, size, mode, mtime, owner, digest
                              (XXH3-128; SHA-256 in points written before 2026-12-01);
                              each archive's own SHA-256
        manifest.mac          HMAC-SHA256 of manifest.json by the site's restore key
        COMPLETE              written last, after the archives were verified

Only a folder with COMPLETE is ever chosen; pure functions here decide which.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

# 3: sealed (manifest.mac), the hub state encrypted (hub.tar.enc), archives digested with
#    SHA-256, modes without setuid/setgid/sticky bits. Points of schema 1 and 2 (no seal) are
#    refused: nothing tells them from forged ones.
SCHEMA_VERSION = 3
COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
SEAL = "manifest.mac"
HUB_ARCHIVE = "hub"
HUB_ARCHIVE_FILE = "hub.tar.enc"
# What of a local runtime is the hub's state (kept in hub.tar): everything else is rebuilt by deploy.
HUB_PATHS = ["hub/jupyterhub.sqlite", "secrets", "state.json"]


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    type: Literal["file", "dir", "symlink"]
    mode: int
    mtime: float
    mtime_ns: int | None = None
    uid: int = 0
    gid: int = 0
    size: int = 0
    # Hex, by its archive's file_hash; points written before 2026-12-01 call it "sha256".
    digest: str | None = Field(None, validation_alias=AliasChoices("digest", "sha256"))
    target: str | None = None


class ArchiveEntry(BaseModel):
    """One archive of a restore point: a user's home, or the hub's state."""

    model_config = ConfigDict(frozen=True)

    name: str
    archive: str
    files: list[FileEntry]
    archive_hash: str  # "algorithm:hex" over every byte of the archive file
    # Its files' digests: they only name a damaged file once archive_hash has not matched.
    file_hash: str = "sha256"  # what points written before 2026-12-01 used
    # A fast digest of the same bytes ("xxh3_128:hex"), for teardown's read-back check that the
    # disk kept what was written; restore trusts archive_hash (SHA-256), never this.
    readback_hash: str | None = None
    encryption: str | None = None  # the cipher of an encrypted archive (core.sealing.CIPHER_SCHEME)

    @field_validator("name", "archive")
    @classmethod
    def _one_component(cls, value: str) -> str:
        # Restore joins these to folder names: a user, or an archive, is one path component.
        if not value or "/" in value or "\0" in value or value in (".", ".."):
            raise ValueError(f"{value!r} is not a single file name")
        return value

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def hash_algorithm(self) -> str:
        return self.archive_hash.partition(":")[0]


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: int = SCHEMA_VERSION
    id: str
    site: str
    created: datetime
    image: str | None
    image_ref: dict | None = None
    hub_config_hash: str | None
    users: list[ArchiveEntry]
    hub: ArchiveEntry

    @property
    def total_files(self) -> int:
        return sum(len(u.files) for u in self.users) + len(self.hub.files)

    @property
    def total_bytes(self) -> int:
        return sum(u.bytes for u in self.users) + self.hub.bytes


class RestorePoint(BaseModel):
    """A restore point folder as found on disk."""

    model_config = ConfigDict(frozen=True)

    id: str
    path: Path | str  # a folder on this machine, or a gs:// prefix of the gke target
    complete: bool


def restore_point_id(now: datetime, salt: str) -> str:
    return f"rp-{now.strftime('%Y%m%dT%H%M%S%fZ')}-{salt[:6]}"


def newest_complete(points: list[RestorePoint]) -> RestorePoint | None:
    complete = [p for p in points if p.complete]
    return max(complete, key=lambda p: p.id) if complete else None


def choose_restore_point(points: list[RestorePoint], wanted: str | None) -> RestorePoint:
    """The newest complete point, or the one asked for, which must be complete."""
    if wanted:
        for point in points:
            if point.id == wanted:
                if not point.complete:
                    raise ValueError(f"restore point {wanted} is incomplete (its teardown did not finish); it cannot be restored")
                return point
        known = ", ".join(p.id for p in points if p.complete) or "none"
        raise ValueError(f"no restore point {wanted} (complete ones: {known})")
    chosen = newest_complete(points)
    if chosen is None:
        raise ValueError("no complete restore point to restore from")
    return chosen


def plan_prune(points: list[RestorePoint], keep: int, protect: set[str] = frozenset()) -> list[RestorePoint]:
    """What retention removes: complete points beyond the newest ``keep``, and
    incomplete ones older than the newest complete point; never the newest
    complete one, never a protected one."""
    keep = max(keep, 1)
    complete = sorted((p for p in points if p.complete), key=lambda p: p.id, reverse=True)
    newest = complete[0].id if complete else None
    doomed = [p for p in complete[keep:]]
    if newest:
        doomed += [p for p in points if not p.complete and p.id < newest]
    return [p for p in doomed if p.id != newest and p.id not in protect]


class TeardownMark(BaseModel):
    """Kept beside the restore points: where an interrupted teardown or restore stood."""

    phase: Literal["deleting", "torn-down", "restoring"]
    restore_point: str
    since: datetime
