"""The backup location on disk: archives of user homes and hub state, verified.

Archives are plain tar files (``core.tarball``) written in one pass that also
takes every file's SHA-256 and the archive's own digest; verification reads
them back. Extraction goes to a staging folder and every extracted file is
checked against the manifest before the staging folder may replace anything.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from core import tarball
from core.files import write_json
from core.logs import progress, task_logger
from core.models import ImageRef, UserRestore
from core.restore_points import (
    COMPLETE,
    HUB_ARCHIVE,
    HUB_PATHS,
    MANIFEST,
    ArchiveEntry,
    FileEntry,
    Manifest,
    RestorePoint,
    plan_prune,
)
from core.tarball import Member


class BackupError(RuntimeError):
    pass


class VerificationFailed(BackupError):
    """A restore point does not match its manifest; the message names what."""


def _entry(member: Member) -> FileEntry:
    # Built without validation: the values come straight from lstat and our own hashing.
    return FileEntry.model_construct(
        path=member.path, type=member.type, mode=member.mode, mtime=member.mtime_ns / 1e9,
        mtime_ns=member.mtime_ns, uid=member.uid, gid=member.gid, size=member.size,
        sha256=member.sha256, target=member.target,
    )


def scan(root: Path, include: list[str] | None = None) -> tuple[int, int]:
    """(files, bytes) below root: for planning and for the space check."""
    files = size = 0
    for _rel, st in tarball.walk(root, include):
        if stat.S_ISREG(st.st_mode):
            files += 1
            size += st.st_size
    return files, size


def write_archive(root: Path, archive: Path, name: str, include: list[str] | None = None) -> ArchiveEntry:
    """Archive root (or the listed paths below it), hashing every file as it is read.

    The archive is private (0600) from its first byte: the hub's holds its
    secrets. Its writeback is started, not awaited: ``verify_archive`` with
    ``durable=True`` makes it durable."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".partial")
    try:
        members, digest = tarball.write(root, tmp, include)
    except (tarball.ArchiveError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise BackupError(f"{name}: {detail}") from None
    os.replace(tmp, archive)
    return ArchiveEntry(name=name, archive=archive.name, files=[_entry(m) for m in members], archive_hash=digest)


def _check_listing(member: Member, want: FileEntry | None, who: str, *, content: bool) -> None:
    if want is None:
        raise VerificationFailed(f"{who}: {member.path}: in the archive but not in the manifest")
    if member.type != want.type or (member.type == "file" and member.size != want.size):
        raise VerificationFailed(f"{who}: {member.path}: size or type differs from the manifest")
    if member.type == "symlink" and member.target != want.target:
        raise VerificationFailed(f"{who}: {member.path}: link target differs from the manifest")
    if content and member.type == "file" and member.sha256 != want.sha256:
        raise VerificationFailed(f"{who}: {member.path}: content differs from the manifest (sha256 mismatch)")


def _check_members(found: list[Member], expected: dict[str, FileEntry], who: str, *, content: bool) -> None:
    """Every member as the manifest lists it, and every listed path in the archive."""
    for member in found:
        _check_listing(member, expected.get(member.path), who, content=content)
    missing = sorted(set(expected) - {m.path for m in found})
    if missing:
        raise VerificationFailed(f"{who}: {missing[0]}: in the manifest but not in the archive")


def verify_archive(archive: Path, entry: ArchiveEntry, who: str, *, deep: bool = False, durable: bool = False) -> None:
    """Read an archive back and check it against its manifest entry.

    One pass checks the archive's digest (every byte written) and its listing
    (names, types, sizes, link targets). The per-file SHA-256s are only needed
    to name the damaged file when the digest does not match, so that deeper
    pass runs only then. With durable, the archive is fsynced once it checks out.
    """
    if not archive.is_file():
        raise VerificationFailed(f"{who}: archive {archive.name} is missing")
    try:
        found, digest = tarball.scan(archive, entry.hash_algorithm, hash_files=deep)
    except tarball.ArchiveError as exc:
        if not deep:
            verify_archive(archive, entry, who, deep=True)
        raise VerificationFailed(f"{who}: archive {archive.name} is damaged: {exc}") from None
    _check_members(found, {f.path: f for f in entry.files}, who, content=deep)
    if digest != entry.archive_hash:
        if not deep:
            verify_archive(archive, entry, who, deep=True)
        raise VerificationFailed(f"{who}: archive {archive.name} differs from the one written")
    if durable:
        tarball.durable(archive)


def extract_and_verify(archive: Path, entry: ArchiveEntry, dest: Path, who: str) -> None:
    """Unpack an archive into dest (new entries only: a staging folder) and
    check everything against the manifest, in one pass over the archive.

    Every member must be in the manifest with the same type, size and link
    target before anything of it is written; each file's SHA-256 is taken from
    the bytes written to it; the archive's digest must match; then every
    entry's type, size, mode and link target is checked on disk. On any
    mismatch nothing unpacked is left behind (dest is removed if this made it).
    """
    if not archive.is_file():
        raise VerificationFailed(f"{who}: archive {archive.name} is missing")
    expected = {f.path: f for f in entry.files}
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)

    def expect(member: Member) -> None:
        want = expected.get(member.path)
        _check_listing(member, want, who, content=False)
        if want.mtime_ns is not None:
            member.mtime_ns = want.mtime_ns

    try:
        try:
            found, digest = tarball.unpack(archive, dest, entry.hash_algorithm, expect)
        except tarball.ArchiveError as exc:
            raise VerificationFailed(f"{who}: archive {archive.name}: {exc}") from None
        except OSError as exc:
            raise VerificationFailed(f"{who}: archive {archive.name} could not be unpacked: {exc}") from None
        _check_members(found, expected, who, content=True)
        if digest != entry.archive_hash:
            raise VerificationFailed(f"{who}: archive {archive.name} differs from the one written")
        _check_tree(dest, entry, who)
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        raise


def _check_tree(dest: Path, entry: ArchiveEntry, who: str) -> None:
    for want in entry.files:
        path = dest / want.path if want.path != "." else dest
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise VerificationFailed(f"{who}: {want.path}: missing after unpacking") from None
        if want.type == "symlink":
            if not stat.S_ISLNK(st.st_mode) or os.readlink(path) != want.target:
                raise VerificationFailed(f"{who}: {want.path}: link target differs from the manifest")
            continue
        if stat.S_IMODE(st.st_mode) != want.mode:
            raise VerificationFailed(f"{who}: {want.path}: mode {stat.S_IMODE(st.st_mode):o} differs from the manifest ({want.mode:o})")
        if want.type == "file" and (not stat.S_ISREG(st.st_mode) or st.st_size != want.size):
            raise VerificationFailed(f"{who}: {want.path}: size differs from the manifest")
        if want.type == "dir" and not stat.S_ISDIR(st.st_mode):
            raise VerificationFailed(f"{who}: {want.path}: not a folder after unpacking")


def read_manifest(point: Path) -> Manifest:
    # Through json, not model_validate_json: a file name that is not valid UTF-8 is kept
    # (as os.fsdecode gives it) as a lone surrogate escape, which only json.loads reads back.
    return Manifest.model_validate(json.loads((point / MANIFEST).read_text()))


def write_manifest(point: Path, manifest: Manifest) -> None:
    write_json(point / MANIFEST, manifest.model_dump(mode="json"), mode=0o600)


def mark_complete(point: Path) -> None:
    fd = os.open(point / COMPLETE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("complete\n")
        out.flush()
        os.fsync(out.fileno())
    sync_folder(point)


def flush_filesystem(path: Path) -> None:
    """Everything written to path's filesystem reaches the disk: a restored
    runtime must be durable before the mark that points at its restore point goes."""
    tarball.sync_filesystem(path)


def sync_folder(path: Path) -> None:
    """fsync a folder: the names created in it are on disk."""
    tarball.durable(path)


def list_restore_points(location: Path) -> list[RestorePoint]:
    if not location.is_dir():
        return []
    return sorted(
        (
            RestorePoint(id=p.name, path=p, complete=(p / COMPLETE).is_file() and (p / MANIFEST).is_file())
            for p in location.iterdir()
            if p.is_dir() and p.name.startswith("rp-")
        ),
        key=lambda p: p.id,
    )


def check_writable(location: Path, needed_bytes: int) -> None:
    """Refuse early: the location must take a file and have room for the backup."""
    try:
        location.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=location, prefix=".olab-probe-") as probe:
            probe.write(b"x" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise BackupError(f"backup location {location} is not writable: {exc.strerror or exc}") from None
    free = shutil.disk_usage(location).free
    # Tar headers and the manifest add a little to the data itself.
    margin = needed_bytes // 20 + (8 << 20)
    if free < needed_bytes + margin:
        raise BackupError(
            f"backup location {location} has {free / 2**20:.1f} MiB free; the restore point needs about "
            f"{(needed_bytes + margin) / 2**20:.1f} MiB"
        )


def parallel(jobs, workers: int, on_progress=None):
    """Run callables on a thread pool (hashing and file I/O release the GIL);
    progress(done, total) is called as each one finishes."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(job) for job in jobs]
        if on_progress is not None:
            for done, _ in enumerate(as_completed(futures), 1):
                on_progress(done, len(futures))
        return [future.result() for future in futures]


@task(name="write-restore-point", cache_policy=NO_CACHE)
def write_restore_point(
    site: str, runtime: Path, point: Path, users: list[str], image: ImageRef | None, hub_config_hash: str | None
) -> Manifest:
    """Archive every home (in parallel) and the hub's state; manifest last."""
    (point / "users").mkdir(parents=True, exist_ok=True)
    os.chmod(point, 0o700)
    homes = runtime / "homes"
    jobs = [
        (lambda name=name: write_archive(homes / name, point / "users" / f"{name}.tar", name))
        for name in users
    ]
    jobs.append(lambda: write_archive(runtime, point / f"{HUB_ARCHIVE}.tar", HUB_ARCHIVE, include=HUB_PATHS))
    archives: list[ArchiveEntry] = parallel(jobs, os.cpu_count() or 2, progress(task_logger(), "archived (homes + hub state)"))
    hub_archive = archives.pop()
    manifest = Manifest(
        id=point.name,
        site=site,
        created=datetime.now(UTC),
        image=image.pinned if image else None,
        image_ref=image.model_dump(mode="json") if image else None,
        hub_config_hash=hub_config_hash,
        users=archives,
        hub=hub_archive,
    )
    write_manifest(point, manifest)
    return manifest


@task(name="verify-restore-point", cache_policy=NO_CACHE)
def verify_restore_point(point: Path, manifest: Manifest) -> None:
    """Read every archive back against the manifest, make it durable, then mark the point complete."""
    jobs = [
        (lambda u=u: verify_archive(point / "users" / u.archive, u, f"user {u.name}", durable=True))
        for u in manifest.users
    ]
    jobs.append(lambda: verify_archive(point / manifest.hub.archive, manifest.hub, "hub state", durable=True))
    parallel(jobs, os.cpu_count() or 2, progress(task_logger(), "verified archives"))
    # The archives are on disk (fsynced as they checked out); now their names.
    sync_folder(point / "users")
    mark_complete(point)


@task(name="unpack-and-verify", cache_policy=NO_CACHE)
def unpack_and_verify(point: Path, staging: Path) -> list[UserRestore]:
    """Unpack a restore point into ``staging``; every file checked (in parallel)."""
    manifest = read_manifest(point)
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "homes").mkdir(parents=True)
    # The hub's state unpacks into a folder of its own: no member of it can reach a home
    # (or a link in one); only the hub's own top-level names are then moved into place.
    hub_folder = staging / ".hub-unpack"
    jobs = [
        (lambda u=u: extract_and_verify(point / "users" / u.archive, u, staging / "homes" / u.name, f"user {u.name}"))
        for u in manifest.users
    ]
    jobs.append(lambda: extract_and_verify(point / manifest.hub.archive, manifest.hub, hub_folder, "hub state"))
    try:
        parallel(jobs, os.cpu_count() or 2, progress(task_logger(), "unpacked and verified (homes + hub state)"))
        allowed = {p.split("/")[0] for p in HUB_PATHS}
        for entry in sorted(hub_folder.iterdir()):
            if entry.name not in allowed or entry.is_symlink():
                raise VerificationFailed(f"hub state: {entry.name}: not part of the hub's state")
            os.replace(entry, staging / entry.name)
        hub_folder.rmdir()
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [
        UserRestore(user=u.name, files=sum(f.type == "file" for f in u.files), bytes=u.bytes, verified=True)
        for u in manifest.users
    ]


def prune(location: Path, keep: int, protect: set[str]) -> list[str]:
    """Remove what retention says to; returns the ids removed."""
    doomed = plan_prune(list_restore_points(location), keep, protect)
    for point in doomed:
        shutil.rmtree(point.path)
    return [p.id for p in doomed]
