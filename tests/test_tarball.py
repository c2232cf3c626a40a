"""olab's tar writer and reader: plain tar that GNU tar and Python's tarfile read,
names of every shape, exact metadata, and the checks it makes on the way."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from olab import tarball
from tasks.backup import BackupError, VerificationFailed, extract_and_verify, verify_archive, write_archive

AS_ROOT = os.geteuid() == 0
LONG_DIR = "d" * 120
LONG_NAME = "n" * 99
BAD_UTF8 = os.fsdecode(b"caf\xe9.txt")  # a Latin-1 name: not valid UTF-8


def odd_home(root: Path) -> Path:
    """Names that ustar alone cannot hold, and metadata worth keeping exactly."""
    (root / LONG_DIR / "sub").mkdir(parents=True)
    (root / LONG_DIR / "sub" / LONG_NAME).write_bytes(b"long path\n")
    (root / ("x" * 150)).write_bytes(b"one long name\n")
    (root / "Ünïcödé ✓.ipynb").write_text('{"cells": []}\n')
    (root / BAD_UTF8).write_bytes(b"latin-1\n")
    (root / "exact-block").write_bytes(os.urandom(512))
    (root / "one-over-a-chunk").write_bytes(os.urandom(tarball.CHUNK + 1))
    (root / "empty").write_bytes(b"")
    os.symlink("t" * 150, root / "long-link")
    os.symlink("/nowhere", root / "dangling")
    (root / "sub" / "empty").mkdir(parents=True)
    (root / "private").write_text("secret\n")
    os.chmod(root / "private", 0o600)
    os.utime(root / "private", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    if AS_ROOT:
        os.chown(root / "private", 1000, 1000)
    return root


def tree(root: Path) -> dict[str, tuple]:
    found = {}
    for rel, st in tarball.walk(root):
        path = root / rel if rel != "." else root
        if os.path.islink(path):
            what = ("link", os.readlink(path))
        elif path.is_dir():
            what = ("dir", st.st_mode & 0o7777)
        else:
            what = ("file", st.st_mode & 0o7777, path.read_bytes())
        found[rel] = what
    return found


def test_round_trip_keeps_names_bytes_modes_times_and_owners(tmp_path):
    home = odd_home(tmp_path / "home")
    entry = write_archive(home, tmp_path / "home.tar", "u")
    verify_archive(tmp_path / "home.tar", entry, "user u")
    out = tmp_path / "out"
    extract_and_verify(tmp_path / "home.tar", entry, out, "user u")
    assert tree(out) == tree(home)
    st = (out / "private").stat()
    assert st.st_mtime_ns == 1_700_000_000_123_456_789, "mtimes come back to the nanosecond"
    if AS_ROOT:
        assert (st.st_uid, st.st_gid) == (1000, 1000)


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
def test_gnu_tar_and_python_tarfile_read_olab_archives(tmp_path):
    home = odd_home(tmp_path / "home")
    write_archive(home, tmp_path / "home.tar", "u")
    by_tar = tmp_path / "by-tar"
    by_tar.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "home.tar"), "-C", str(by_tar)], check=True)
    assert tree(by_tar) == tree(home)
    by_tarfile = tmp_path / "by-tarfile"
    with tarfile.open(tmp_path / "home.tar") as tar:
        tar.extractall(by_tarfile, filter="tar")
    assert tree(by_tarfile) == tree(home)


def test_a_file_that_changes_size_while_archived_stops_the_archive(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    grows = home / "grows.log"
    grows.write_bytes(b"x" * 1000)
    sink_copy = tarball._Sink.copy_file

    def copy_then_append(self, fd, size, sha):  # another process writing right after the read
        got = sink_copy(self, fd, size, sha)
        with open(grows, "ab") as more:
            more.write(b"late line\n")
        return got

    tarball._Sink.copy_file = copy_then_append
    try:
        with pytest.raises(BackupError, match="u: grows.log: changed size while being archived"):
            write_archive(home, tmp_path / "home.tar", "u")
    finally:
        tarball._Sink.copy_file = sink_copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"], "no archive, not even a partial one"


def archived(tmp_path: Path):
    archive = tmp_path / "home.tar"
    return archive, write_archive(odd_home(tmp_path / "home"), archive, "u")


def test_a_damaged_header_is_reported_and_nothing_is_left_unpacked(tmp_path):
    archive, entry = archived(tmp_path)
    data = bytearray(archive.read_bytes())
    data[data.index(b"exact-block") + 3] ^= 0x01  # inside a header: its checksum fails
    archive.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match="user u: archive home.tar: a damaged header"):
        extract_and_verify(archive, entry, tmp_path / "out", "user u")
    assert not (tmp_path / "out").exists()


def test_a_truncated_archive_is_refused(tmp_path):
    archive, entry = archived(tmp_path)
    archive.write_bytes(archive.read_bytes()[: tarball.CHUNK // 2])
    with pytest.raises(VerificationFailed, match="user u"):
        verify_archive(archive, entry, "user u")


def test_members_cannot_leave_the_folder(tmp_path):
    for name in ("/etc/passwd", "../up", "a/../../up", "a//b"):
        with pytest.raises(tarball.ArchiveError, match="points outside its folder"):
            tarball._contain(name, set())
    with pytest.raises(tarball.ArchiveError, match="through a symlink"):
        tarball._contain("a/b/c", {"a/b"})
    tarball._contain("a/b/c", {"a/bc"})


def test_verify_names_the_file_whose_bytes_changed(tmp_path):
    """The one-pass check sees the archive's digest differ; the deeper pass names the file."""
    archive, entry = archived(tmp_path)
    data = bytearray(archive.read_bytes())
    data[data.index(b"latin-1\n")] ^= 0x01
    archive.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match=f"user u: {BAD_UTF8}: content differs from the manifest"):
        verify_archive(archive, entry, "user u")
