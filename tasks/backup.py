"""The backup location on disk: archives of user homes and hub state, verified.

Archives are tar files (``core.tarball``) written in one pass that also takes
every file's XXH3-128 (to name a damaged file) and the archive's SHA-256; the
hub's state is encrypted on its way to disk, and the manifest sealed, with the
site's restore key (``core.sealing``). Verification reads them back. A restore checks the seal
before it reads anything else of a point; then every member's header must match
the (authenticated) manifest before anything of it is written, into a staging
folder that replaces nothing until the whole archive's SHA-256 matched.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from core import sealing, tarball
from core.files import atomic_write
from core.logs import progress, task_logger
from core.models import ImageRef, UserRestore
from core.restore_points import (
    COMPLETE,
    HUB_ARCHIVE,
    HUB_ARCHIVE_FILE,
    HUB_PATHS,
    MANIFEST,
    SCHEMA_VERSION,
    SEAL,
    ArchiveEntry,
    FileEntry,
    Manifest,
    RestorePoint,
    plan_prune,
)
from core.sealing import RestoreKey, SealBroken, StreamCipher
from core.tarball import Member
from core.threads import parallel


class BackupError(RuntimeError):
    pass


class VerificationFailed(BackupError):
    """A restore point does not match its manifest; the message names what."""


class NotAuthentic(VerificationFailed, ValueError):
    """A restore point the site's key does not vouch for (altered, forged, from another key, or
    written before points were sealed): refused before any of its archives is read. A
    ValueError too, as a point that cannot be read is to `olab status`."""


def _entry(member: Member) -> FileEntry:
    # Built without validation: the values come straight from lstat and our own hashing.
    return FileEntry.model_construct(
        path=member.path, type=member.type, mode=member.mode, mtime=member.mtime_ns / 1e9,
        mtime_ns=member.mtime_ns, uid=member.uid, gid=member.gid, size=member.size,
        digest=member.digest, target=member.target,
    )


def scan(root: Path, include: list[str] | None = None) -> tuple[int, int]:
    """(files, bytes) below root: for planning and for the space check."""
    files = size = 0
    for _rel, st in tarball.walk(root, include):
        if stat.S_ISREG(st.st_mode):
            files += 1
            size += st.st_size
    return files, size


def write_archive(root: Path, archive: Path, name: str, include: list[str] | None = None,
                  cipher: StreamCipher | None = None) -> ArchiveEntry:
    """Archive root (or the listed paths below it), hashing every file as it is read;
    with cipher, every block is encrypted before it reaches the disk.

    The archive is private (0600) from its first byte. Its writeback is started,
    not awaited: ``verify_archive`` with ``durable=True`` makes it durable."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".partial")
    try:
        members, digest, readback = tarball.write(root, tmp, include, cipher)
    except (tarball.ArchiveError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise BackupError(f"{name}: {detail}") from None
    os.replace(tmp, archive)
    return ArchiveEntry(name=name, archive=archive.name, files=[_entry(m) for m in members], archive_hash=digest,
                        file_hash=tarball.FILE_HASH, readback_hash=readback, encryption=cipher.scheme if cipher else None)


def _check_listing(member: Member, want: FileEntry | None, who: str, *, content: bool) -> None:
    if want is None:
        raise VerificationFailed(f"{who}: {member.path}: in the archive but not in the manifest")
    if member.type != want.type or (member.type == "file" and member.size != want.size):
        raise VerificationFailed(f"{who}: {member.path}: size or type differs from the manifest")
    if member.type == "symlink" and member.target != want.target:
        raise VerificationFailed(f"{who}: {member.path}: link target differs from the manifest")
    if (member.mode, member.uid, member.gid) != (want.mode, want.uid, want.gid):
        raise VerificationFailed(f"{who}: {member.path}: mode or owner differs from the manifest")
    if content and member.type == "file" and member.digest != want.digest:
        raise VerificationFailed(f"{who}: {member.path}: content differs from the manifest (digest mismatch)")


def _check_members(found: list[Member], expected: dict[str, FileEntry], who: str, *, content: bool) -> None:
    """Every member as the manifest lists it, and every listed path in the archive."""
    for member in found:
        _check_listing(member, expected.get(member.path), who, content=content)
    missing = sorted(set(expected) - {m.path for m in found})
    if missing:
        raise VerificationFailed(f"{who}: {missing[0]}: in the manifest but not in the archive")


def _check_cipher(archive: Path, entry: ArchiveEntry, who: str, cipher: StreamCipher | None) -> None:
    reading = cipher.scheme if cipher else None
    if entry.encryption != reading:
        raise VerificationFailed(f"{who}: archive {archive.name} is {entry.encryption or 'plain tar'} in the manifest, "
                                 f"not {reading or 'plain tar'}")


def verify_archive(archive: Path, entry: ArchiveEntry, who: str, *, deep: bool = False, durable: bool = False,
                   cipher: StreamCipher | None = None) -> None:
    """Read an archive back (decrypting it with cipher) and check it against its manifest entry.

    One pass checks the archive's digest (every byte written) and its listing
    (names, types, sizes, modes, owners, link targets): at teardown (durable) its
    read-back digest, XXH3-128, as fast as the disk, for that pass asks only whether
    the disk kept what olab wrote (restore checks the authenticated SHA-256); else the
    SHA-256. The files' digests are only needed to name the damaged file when the
    digest does not match, so that deeper pass runs only then. With durable, the
    archive is fsynced once it checks out.
    """
    _check_cipher(archive, entry, who, cipher)
    if not archive.is_file():
        raise VerificationFailed(f"{who}: archive {archive.name} is missing")
    expected = entry.readback_hash if durable and entry.readback_hash and not deep else entry.archive_hash
    try:
        found, digest = tarball.scan(archive, expected.split(":", 1)[0], file_hash=entry.file_hash if deep else None,
                                     cipher=cipher)
    except tarball.ArchiveError as exc:
        if not deep:
            verify_archive(archive, entry, who, deep=True, cipher=cipher)
        raise VerificationFailed(f"{who}: archive {archive.name} is damaged: {exc}") from None
    _check_members(found, {f.path: f for f in entry.files}, who, content=deep)
    if digest != expected:
        if not deep:
            verify_archive(archive, entry, who, deep=True, cipher=cipher)
        raise VerificationFailed(f"{who}: archive {archive.name} differs from the one written")
    if durable:
        tarball.durable(archive)


def extract_and_verify(archive: Path, entry: ArchiveEntry, dest: Path, who: str, cipher: StreamCipher | None = None) -> None:
    """Unpack an archive (decrypting it with cipher) into dest (new entries only:
    a staging folder) and check everything against the manifest, in one pass.

    Every member must be in the manifest with the same type, size, mode, owner
    and link target before anything of it is written; the SHA-256 of every byte
    read must be the archive's (so every file's bytes are the ones written;
    when not, a second pass names the file); then every entry's type, size,
    mode and link target is checked on disk. On any mismatch nothing unpacked
    is left behind (dest is removed if this made it).
    """
    _check_cipher(archive, entry, who, cipher)
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
            found, digest = tarball.unpack(archive, dest, entry.hash_algorithm, expect, cipher=cipher)
        except tarball.ArchiveError as exc:
            raise VerificationFailed(f"{who}: archive {archive.name}: {exc}") from None
        except OSError as exc:
            raise VerificationFailed(f"{who}: archive {archive.name} could not be unpacked: {exc}") from None
        _check_members(found, expected, who, content=False)
        if digest != entry.archive_hash:
            # Hashing the archive, not each file too, keeps one SHA-256 per byte; naming the
            # changed file takes a second read, only when something did change.
            verify_archive(archive, entry, who, deep=True, cipher=cipher)
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


def manifest_bytes(manifest: Manifest) -> bytes:
    """The manifest as written, and sealed: these exact bytes."""
    return (json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def _unsealed(point: Path, data: bytes) -> str:
    try:
        schema = json.loads(data).get("schema_version", 1)
    except (ValueError, AttributeError):
        schema = None
    if isinstance(schema, int) and schema < SCHEMA_VERSION:
        return (
            f"restore point {point.name} was written before olab sealed restore points (schema {schema}, no {SEAL}): "
            "nothing tells it from a forged one, so olab will not restore it; if you trust it, unpack it by hand "
            "(plain tar: hub.tar into the runtime folder, users/<name>.tar into its homes/<name>; "
            "README: 'Keeping the restore key safe')"
        )
    return (f"restore point {point.name}: {MANIFEST} is not authenticated by this site's key "
            f"(altered, forged, or from another key): its seal {SEAL} is missing")


def _read_sealed(point: Path, key: RestoreKey) -> tuple[bytes, Manifest]:
    try:
        data = (point / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise NotAuthentic(f"restore point {point.name}: {MANIFEST} is missing") from None
    try:
        seal = (point / SEAL).read_bytes()
    except FileNotFoundError:
        raise NotAuthentic(_unsealed(point, data)) from None
    try:
        sealing.check_seal(key, data, seal)
    except SealBroken as exc:
        raise NotAuthentic(
            f"restore point {point.name}: {MANIFEST} is not authenticated by this site's key "
            f"(altered, forged, or from another key)" + (f": {exc}" if str(exc) else "")
        ) from None
    # Through json, not model_validate_json: a file name that is not valid UTF-8 is kept
    # (as os.fsdecode gives it) as a lone surrogate escape, which only json.loads reads back.
    manifest = Manifest.model_validate(json.loads(data))
    if manifest.id != point.name or manifest.site != key.site:
        raise NotAuthentic(f"restore point {point.name}: {MANIFEST} is sealed for {manifest.site}'s {manifest.id}, not for this point")
    return data, manifest


def read_manifest(point: Path, key: RestoreKey) -> Manifest:
    """The point's manifest, once its seal shows the site's key made it (NotAuthentic when not):
    read before anything else of the point, it vouches for every archive and every file."""
    return _read_sealed(point, key)[1]


def write_manifest(point: Path, manifest: Manifest, key: RestoreKey) -> None:
    data = manifest_bytes(manifest)
    atomic_write(point / MANIFEST, data, mode=0o600)
    atomic_write(point / SEAL, sealing.seal(key, data), mode=0o600)


def _hub_cipher(key: RestoreKey, point_id: str, archive: str) -> StreamCipher:
    return key.stream(f"{point_id}/{archive}")


def _in_point(point: Path, archive: str, check) -> None:
    """Run one archive's check; a mismatch is the restore point's, naming the archive."""
    try:
        check()
    except VerificationFailed as exc:
        raise VerificationFailed(f"restore point {point.name}: {archive} does not match its manifest ({exc})") from None


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


@task(name="write-restore-point", cache_policy=NO_CACHE)
def write_restore_point(
    key: RestoreKey, runtime: Path, point: Path, users: list[str], image: ImageRef | None, hub_config_hash: str | None
) -> Manifest:
    """Archive every home (in parallel) and the hub's state (encrypted); manifest and its seal last."""
    (point / "users").mkdir(parents=True, exist_ok=True)
    os.chmod(point, 0o700)
    homes = runtime / "homes"
    jobs = [
        (lambda name=name: write_archive(homes / name, point / "users" / f"{name}.tar", name))
        for name in users
    ]
    jobs.append(lambda: write_archive(runtime, point / HUB_ARCHIVE_FILE, HUB_ARCHIVE, include=HUB_PATHS,
                                      cipher=_hub_cipher(key, point.name, HUB_ARCHIVE_FILE)))
    archives: list[ArchiveEntry] = parallel(jobs, os.cpu_count() or 2, progress(task_logger(), "archived (homes + hub state)"))
    hub_archive = archives.pop()
    manifest = Manifest(
        id=point.name,
        site=key.site,
        created=datetime.now(UTC),
        image=image.pinned if image else None,
        image_ref=image.model_dump(mode="json") if image else None,
        hub_config_hash=hub_config_hash,
        users=archives,
        hub=hub_archive,
    )
    write_manifest(point, manifest, key)
    return manifest


@task(name="verify-restore-point", cache_policy=NO_CACHE)
def verify_restore_point(point: Path, manifest: Manifest, key: RestoreKey) -> None:
    """Check the seal, read every archive back against the manifest, make it durable,
    then mark the point complete."""
    data, sealed = _read_sealed(point, key)
    if data != manifest_bytes(manifest):
        raise VerificationFailed(f"restore point {point.name}: {MANIFEST} differs from the one written")
    jobs = [
        (lambda u=u: _in_point(point, f"users/{u.archive}", lambda: verify_archive(
            point / "users" / u.archive, u, f"user {u.name}", durable=True)))
        for u in sealed.users
    ]
    hub = sealed.hub
    jobs.append(lambda: _in_point(point, hub.archive, lambda: verify_archive(
        point / hub.archive, hub, "hub state", durable=True, cipher=_hub_cipher(key, sealed.id, hub.archive))))
    parallel(jobs, os.cpu_count() or 2, progress(task_logger(), "verified archives"))
    # The archives are on disk (fsynced as they checked out); now their names.
    sync_folder(point / "users")
    mark_complete(point)


@task(name="unpack-and-verify", cache_policy=NO_CACHE)
def unpack_and_verify(point: Path, staging: Path, key: RestoreKey) -> list[UserRestore]:
    """Unpack a restore point into ``staging``; its seal first, then every file checked (in parallel)."""
    manifest = read_manifest(point, key)  # before anything of the point is unpacked
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "homes").mkdir(parents=True)
    # The hub's state unpacks into a folder of its own: no member of it can reach a home
    # (or a link in one); only the hub's own top-level names are then moved into place.
    hub_folder = staging / ".hub-unpack"
    jobs = [
        (lambda u=u: _in_point(point, f"users/{u.archive}", lambda: extract_and_verify(
            point / "users" / u.archive, u, staging / "homes" / u.name, f"user {u.name}")))
        for u in manifest.users
    ]
    hub = manifest.hub
    jobs.append(lambda: _in_point(point, hub.archive, lambda: extract_and_verify(
        point / hub.archive, hub, hub_folder, "hub state", cipher=_hub_cipher(key, manifest.id, hub.archive))))
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
