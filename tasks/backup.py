"""The backup location on disk: archives of user homes and hub state, verified.

Archives are plain (uncompressed) PAX tar files written in one pass that also
hashes every file; verification reads them back. Extraction goes to a staging
folder and every extracted file is checked against the manifest before the
staging folder may replace anything.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from olab.files import write_json
from olab.restore_points import COMPLETE, MANIFEST, ArchiveEntry, FileEntry, Manifest, RestorePoint

CHUNK = 1 << 20


class BackupError(RuntimeError):
    pass


class VerificationFailed(BackupError):
    """A restore point does not match its manifest; the message names what."""


class _HashingWriter:
    """A file wrapper that hashes what passes through it."""

    def __init__(self, raw):
        self.raw = raw
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()


class _HashingReader:
    def __init__(self, raw):
        self.raw = raw
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data


def _walk(root: Path, include: list[str] | None) -> list[Path]:
    """Every entry below root (dirs, files, symlinks), parents before children."""
    starts = [root / p for p in include] if include is not None else [root]
    found: list[Path] = []
    for start in starts:
        if not start.exists() and not start.is_symlink():
            continue
        found.append(start)
        if start.is_dir() and not start.is_symlink():
            for folder, dirs, files in os.walk(start):
                dirs.sort()
                here = Path(folder)
                for name in dirs:
                    found.append(here / name)
                for name in sorted(files):
                    found.append(here / name)
    return found


def _rel(root: Path, path: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel if rel else "."


def scan(root: Path, include: list[str] | None = None) -> tuple[int, int]:
    """(files, bytes) below root: for planning and for the space check."""
    files = size = 0
    for path in _walk(root, include):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            files += 1
            size += st.st_size
    return files, size


def write_archive(root: Path, archive: Path, name: str, include: list[str] | None = None) -> ArchiveEntry:
    """Archive root (or the listed paths below it); hash every file as it is read."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".partial")
    entries: list[FileEntry] = []
    # Private from the first byte: the hub's archive holds its secrets.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw:
        out = _HashingWriter(raw)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in _walk(root, include):
                st = path.lstat()
                rel = _rel(root, path)
                info = tarfile.TarInfo(rel)
                info.mode = stat.S_IMODE(st.st_mode)
                info.mtime = st.st_mtime
                info.uid, info.gid = st.st_uid, st.st_gid
                common = {"path": rel, "mode": info.mode, "mtime": st.st_mtime, "uid": st.st_uid, "gid": st.st_gid}
                if stat.S_ISLNK(st.st_mode):
                    info.type = tarfile.SYMTYPE
                    info.linkname = os.readlink(path)
                    tar.addfile(info)
                    entries.append(FileEntry(type="symlink", target=info.linkname, **common))
                elif stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                    entries.append(FileEntry(type="dir", **common))
                elif stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as source:
                        reader = _HashingReader(source)
                        info.size = st.st_size
                        tar.addfile(info, reader)
                    entries.append(FileEntry(type="file", size=st.st_size, sha256=reader.digest.hexdigest(), **common))
                # Sockets, fifos and devices are not a student's work: skipped.
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, archive)
    return ArchiveEntry(name=name, archive=archive.name, files=entries, archive_sha256=out.digest.hexdigest())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(archive: Path, entry: ArchiveEntry, who: str, *, deep: bool = False) -> None:
    """Read an archive back and check it against its manifest entry.

    One pass checks the archive's own hash and its listing (names, types,
    sizes, link targets). The per-file content hashes are only needed to name
    the damaged file when the archive's hash does not match, so that deeper
    pass runs only then.
    """
    if not archive.is_file():
        raise VerificationFailed(f"{who}: archive {archive.name} is missing")
    expected = {f.path: f for f in entry.files}
    seen: set[str] = set()
    try:
        with open(archive, "rb") as raw:
            reader = _HashingReader(raw)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    want = expected.get(member.name)
                    if want is None:
                        raise VerificationFailed(f"{who}: {member.name}: in the archive but not in the manifest")
                    seen.add(member.name)
                    if member.isfile():
                        if member.size != want.size or want.type != "file":
                            raise VerificationFailed(f"{who}: {member.name}: size or type differs from the manifest")
                        if deep:
                            digest = hashlib.sha256()
                            handle = tar.extractfile(member)
                            while block := handle.read(CHUNK):
                                digest.update(block)
                            if digest.hexdigest() != want.sha256:
                                raise VerificationFailed(f"{who}: {member.name}: content differs from the manifest (sha256 mismatch)")
                    elif member.issym():
                        if member.linkname != want.target:
                            raise VerificationFailed(f"{who}: {member.name}: link target differs from the manifest")
                    elif not member.isdir():
                        raise VerificationFailed(f"{who}: {member.name}: an entry of a kind olab never writes")
                # Drain the tail so the archive's hash covers every byte.
                while reader.read(CHUNK):
                    pass
    except tarfile.TarError as exc:
        if not deep:
            verify_archive(archive, entry, who, deep=True)
        raise VerificationFailed(f"{who}: archive {archive.name} is damaged: {exc}") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise VerificationFailed(f"{who}: {missing[0]}: in the manifest but not in the archive")
    if reader.digest.hexdigest() != entry.archive_sha256:
        if not deep:
            verify_archive(archive, entry, who, deep=True)
        raise VerificationFailed(f"{who}: archive {archive.name} differs from the one written")


def _contained(dest: Path):
    """A tar filter that keeps every member inside dest: no absolute or .. paths,
    no hard links or device files, and no path through a symlink (a member
    cannot write through a link an earlier member made)."""

    def check(member: tarfile.TarInfo, _dest: str) -> tarfile.TarInfo:
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts:
            raise VerificationFailed(f"archive member {member.name!r} points outside its folder")
        if not (member.isfile() or member.isdir() or member.issym()):
            raise VerificationFailed(f"archive member {member.name!r} is a kind olab never writes")
        here = dest
        for part in parts[:-1]:
            here = here / part
            if here.is_symlink():
                raise VerificationFailed(f"archive member {member.name!r} would be written through a symlink")
        return member

    return check


def extract_and_verify(archive: Path, entry: ArchiveEntry, dest: Path, who: str) -> None:
    """Check the archive, unpack it into dest (a staging folder), then check
    every unpacked file against the manifest."""
    verify_archive(archive, entry, who)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            tar.extractall(dest, numeric_owner=True, filter=_contained(dest))
    except (tarfile.TarError, OSError) as exc:
        raise VerificationFailed(f"{who}: archive {archive.name} could not be unpacked: {exc}") from None
    _check_tree(dest, entry, who)


def _check_tree(dest: Path, entry: ArchiveEntry, who: str) -> None:
    for want in entry.files:
        path = dest / want.path if want.path != "." else dest
        if not path.exists() and not path.is_symlink():
            raise VerificationFailed(f"{who}: {want.path}: missing after unpacking")
        st = path.lstat()
        if want.type == "symlink":
            if not stat.S_ISLNK(st.st_mode) or os.readlink(path) != want.target:
                raise VerificationFailed(f"{who}: {want.path}: link target differs from the manifest")
            continue
        if stat.S_IMODE(st.st_mode) != want.mode:
            raise VerificationFailed(f"{who}: {want.path}: mode {stat.S_IMODE(st.st_mode):o} differs from the manifest ({want.mode:o})")
        if want.type == "file":
            if st.st_size != want.size or file_sha256(path) != want.sha256:
                raise VerificationFailed(f"{who}: {want.path}: content differs from the manifest (sha256 mismatch)")


def read_manifest(point: Path) -> Manifest:
    return Manifest.model_validate_json((point / MANIFEST).read_text())


def write_manifest(point: Path, manifest: Manifest) -> None:
    write_json(point / MANIFEST, manifest.model_dump(mode="json"), mode=0o600)


def mark_complete(point: Path) -> None:
    fd = os.open(point / COMPLETE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("complete\n")
        out.flush()
        os.fsync(out.fileno())
    dir_fd = os.open(point, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def parallel(jobs, workers: int):
    """Run callables on a thread pool (hashing and file I/O release the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda job: job(), jobs))
