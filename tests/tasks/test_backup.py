"""Restore points on disk, without any server: archives, verification, containment."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from core.restore_points import ArchiveEntry, FileEntry, RestorePoint, choose_restore_point, plan_prune
from tasks.backup import VerificationFailed, extract_and_verify, verify_archive, write_archive


def make_home(root: Path) -> Path:
    (root / "sub" / "empty").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("alpha\n")
    (root / "b c.bin").write_bytes(os.urandom(300_000))
    os.symlink("sub/a.txt", root / "link")
    os.symlink("/nowhere", root / "dangling")
    return root


def test_a_flipped_byte_is_named_by_file(tmp_path):
    home = make_home(tmp_path / "home")
    archive = tmp_path / "home.tar"
    entry = write_archive(home, archive, "u")
    data = bytearray(archive.read_bytes())
    data[data.index(b"alpha")] ^= 0x20
    archive.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match=r"user u: sub/a.txt: content differs"):
        extract_and_verify(archive, entry, tmp_path / "out", "user u")
    assert not (tmp_path / "out").exists(), "nothing unpacked from a damaged archive is left"


def _crafted(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> tuple[Path, ArchiveEntry]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    archive = tmp_path / "evil.tar"
    archive.write_bytes(buffer.getvalue())
    files = []
    for info, data in members:
        kind = "symlink" if info.issym() else ("dir" if info.isdir() else "file")
        files.append(FileEntry(path=info.name, type=kind, mode=info.mode, mtime=0, size=info.size,
                               sha256=hashlib.sha256(data).hexdigest() if data is not None else None,
                               target=info.linkname or None))
    return archive, ArchiveEntry(name="evil", archive=archive.name, files=files,
                                 archive_sha256=hashlib.sha256(archive.read_bytes()).hexdigest())


def test_an_archive_cannot_write_outside_its_staging_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = tarfile.TarInfo("a")
    link.type, link.linkname = tarfile.SYMTYPE, str(outside)
    payload = b"gotcha"
    escape = tarfile.TarInfo("a/x")
    escape.size = len(payload)
    archive, entry = _crafted(tmp_path, [(link, None), (escape, payload)])
    with pytest.raises(VerificationFailed, match="through a symlink"):
        extract_and_verify(archive, entry, tmp_path / "staging", "user evil")
    assert not (outside / "x").exists()


def test_a_member_missing_from_the_manifest_is_refused(tmp_path):
    home = make_home(tmp_path / "home")
    archive = tmp_path / "home.tar"
    entry = write_archive(home, archive, "u")
    fewer = entry.model_copy(update={"files": [f for f in entry.files if f.path != "link"]})
    with pytest.raises(VerificationFailed, match="link: in the archive but not in the manifest"):
        verify_archive(archive, fewer, "user u")


def test_choosing_and_pruning_restore_points():
    points = [
        RestorePoint(id="rp-1", path=Path("1"), complete=True),
        RestorePoint(id="rp-2", path=Path("2"), complete=False),
        RestorePoint(id="rp-3", path=Path("3"), complete=True),
        RestorePoint(id="rp-4", path=Path("4"), complete=True),
        RestorePoint(id="rp-5", path=Path("5"), complete=False),
    ]
    assert choose_restore_point(points, None).id == "rp-4"
    assert choose_restore_point(points, "rp-1").id == "rp-1"
    with pytest.raises(ValueError, match="incomplete"):
        choose_restore_point(points, "rp-5")
    pruned = {p.id for p in plan_prune(points, keep=2)}
    assert pruned == {"rp-1", "rp-2"}, "the newest incomplete one may be a teardown still running"
    assert "rp-4" not in {p.id for p in plan_prune(points, keep=0)}


def test_a_schema_1_restore_point_still_restores(tmp_path):
    """Before olab/tarball.py, archives were tarfile's PAX (float mtimes in PAX records) and
    the manifest held "archive_sha256": such a point must still restore."""

    def member(name: str, kind: bytes, mode: int, data: bytes | None = None, link: str = "") -> tuple:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.linkname = kind, mode, 1_700_000_000.25, link
        info.size = len(data) if data is not None else 0
        return info, data

    archive, entry = _crafted(tmp_path, [
        member(".", tarfile.DIRTYPE, 0o755),
        member("notes", tarfile.DIRTYPE, 0o700),
        member("notes/ü ber.txt", tarfile.REGTYPE, 0o640, b"kept\n"),
        member("latest", tarfile.SYMTYPE, 0o777, link="notes/ü ber.txt"),
    ])
    assert entry.archive_hash.startswith("sha256:")
    out = tmp_path / "out"
    extract_and_verify(archive, entry, out, "user old")
    assert (out / "latest").read_bytes() == b"kept\n"
    st = (out / "notes" / "ü ber.txt").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime == 1_700_000_000.25
    assert stat.S_IMODE((out / "notes").stat().st_mode) == 0o700
