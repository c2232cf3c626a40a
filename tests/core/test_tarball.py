"""olab's tar writer and reader: plain tar that GNU tar and Python's tarfile read,
names of every shape, exact metadata, and the checks it makes on the way."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from core import tarball
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


def test_an_unknown_hash_is_named_for_files_and_archives_alike():
    assert tarball.new_digest("sha256").name == "sha256"
    assert tarball.new_digest(tarball.FILE_HASH).digest_size == 16
    with pytest.raises(tarball.ArchiveError, match="unknown hash algorithm 'md5' .*sha256 and xxh3_128"):
        tarball.new_digest("md5")


def test_a_manifest_with_a_non_utf8_name_reads_back(tmp_path):
    """json.dumps escapes the name's surrogate; only json.loads (not pydantic's JSON parser) reads it."""
    from datetime import UTC, datetime

    from core.restore_points import Manifest
    from core.sealing import load_or_create_key
    from tasks.backup import read_manifest, write_manifest

    archive, entry = archived(tmp_path)
    hub = write_archive(tmp_path / "home", tmp_path / "hub.tar", "hub", include=["empty"])
    key, _ = load_or_create_key("s", tmp_path / "keys" / "s.restore-key")
    point = tmp_path / "rp-1"
    point.mkdir()
    write_manifest(point, Manifest(id="rp-1", site="s", created=datetime.now(UTC), image=None,
                                   hub_config_hash=None, users=[entry], hub=hub), key)
    again = read_manifest(point, key).users[0]
    assert BAD_UTF8 in {f.path for f in again.files}
    extract_and_verify(archive, again, tmp_path / "out", "user u")
    assert (tmp_path / "out" / BAD_UTF8).read_bytes() == b"latin-1\n"


def test_manifest_names_are_single_file_names():
    from pydantic import ValidationError

    from core.restore_points import ArchiveEntry

    for bad in ("../../x", "a/b", "..", ""):
        with pytest.raises(ValidationError, match="not a single file name"):
            ArchiveEntry(name=bad, archive="u.tar", files=[], archive_hash="sha256:00")


def _raw_archive(path: Path, *blocks: bytes) -> Path:
    data = b"".join(b + bytes(-len(b) % tarball.BLOCK) for b in blocks) + bytes(2 * tarball.BLOCK)
    path.write_bytes(data)
    return path


@pytest.mark.timeout(30)
def test_crafted_headers_are_refused_not_misread(tmp_path):
    # A link with data: tar readers disagree on whether to skip it, so olab refuses it.
    link = tarball._ustar(b"link", b"2", 0o777, 0, 0, 1024, 0, b"target")
    with pytest.raises(tarball.ArchiveError, match="link: a damaged header"):
        tarball.scan(_raw_archive(tmp_path / "a.tar", link, bytes(1024)), "sha256")
    # A negative PAX size would move the reader backwards, forever.
    record = b"14 size=-1536\n"
    pax = tarball._ustar(b"././@PaxHeader", b"x", 0o644, 0, 0, len(record), 0, b"")
    file = tarball._ustar(b"f", b"0", 0o644, 0, 0, 0, 0, b"")
    with pytest.raises(tarball.ArchiveError, match="f: a damaged header"):
        tarball.scan(_raw_archive(tmp_path / "b.tar", pax, record, file), "sha256")
    # A PAX record that does not parse.
    record = b"zz size=1\n"
    pax = tarball._ustar(b"././@PaxHeader", b"x", 0o644, 0, 0, len(record), 0, b"")
    with pytest.raises(tarball.ArchiveError, match="a damaged PAX header"):
        tarball.scan(_raw_archive(tmp_path / "c.tar", pax, record, file), "sha256")


@pytest.mark.timeout(30)
def test_a_file_swapped_for_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    member = tarball.Member(path="pipe", type="file", mode=0o644, mtime_ns=0)
    fd = os.open(tmp_path / "out.tar", os.O_WRONLY | os.O_CREAT, 0o600)
    folder = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(tarball.ArchiveError, match="pipe: changed while being archived"):
            tarball._archive_file(tarball._Sink(fd), folder, "pipe", member, tarball.FILE_HASH)
    finally:
        os.close(fd)
        os.close(folder)


def test_a_folder_swapped_for_a_symlink_during_the_walk_stops_it(tmp_path):
    """A process racing the teardown must not get files from outside the home archived."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_text("not the student's\n")
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    (home / "sub" / "mine.txt").write_text("mine\n")
    seen = []
    with pytest.raises(tarball.ArchiveError, match="sub: changed while being archived"):
        for rel, _st in tarball.walk(home):
            seen.append(rel)
            if rel == "sub":  # listed as a folder; swapped before the walk goes in
                os.rename(home / "sub", home / "sub-real")
                os.symlink(outside, home / "sub")
    assert "sub/shadow" not in seen


def test_a_time_before_1970_is_kept_for_other_tar_readers_too(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "old").write_bytes(b"punched card\n")
    os.utime(home / "old", (-86400 * 365, -86400 * 365))
    write_archive(home, tmp_path / "home.tar", "u")
    with tarfile.open(tmp_path / "home.tar") as tar:
        assert tar.getmember("old").mtime == -86400 * 365


def modes(root: Path) -> dict[str, int]:
    return {rel: st.st_mode & 0o7777 for rel, st in tarball.walk(root) if not os.path.islink(root / rel)}


def test_setuid_setgid_and_sticky_bits_are_neither_archived_nor_restored(tmp_path):
    home = tmp_path / "home"
    (home / "shared").mkdir(parents=True)
    os.chmod(home / "shared", 0o1777)
    (home / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(home / "tool", 0o4755)
    (home / "group-tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(home / "group-tool", 0o2750)
    assert modes(home)["tool"] == 0o4755 and modes(home)["shared"] == 0o1777
    entry = write_archive(home, tmp_path / "home.tar", "u")
    recorded = {f.path: f.mode for f in entry.files}
    assert (recorded["tool"], recorded["group-tool"], recorded["shared"]) == (0o755, 0o750, 0o777)
    with tarfile.open(tmp_path / "home.tar") as tar:  # the headers too, for anyone running tar -xpf
        assert {m.name: m.mode for m in tar}["tool"] == 0o755
    out = tmp_path / "out"
    extract_and_verify(tmp_path / "home.tar", entry, out, "user u")
    assert (modes(out)["tool"], modes(out)["group-tool"], modes(out)["shared"]) == (0o755, 0o750, 0o777)


def test_unpacking_clears_setuid_whatever_the_archive_says(tmp_path):
    """An archive olab did not write (or that says so) still brings no setuid file back."""
    data = b"#!/bin/sh\n"
    tool = tarball._ustar(b"tool", b"0", 0o4755, 0, 0, len(data), 0, b"")
    shared = tarball._ustar(b"shared/", b"5", 0o3777, 0, 0, 0, 0, b"")
    archive = _raw_archive(tmp_path / "a.tar", tool, data, shared)
    out = tmp_path / "out"
    out.mkdir()
    found, _ = tarball.unpack(archive, out, "sha256", lambda member: None)
    assert {m.path: m.mode for m in found} == {"tool": 0o4755, "shared": 0o3777}, "the headers did ask for them"
    assert modes(out)["tool"] == 0o755 and modes(out)["shared"] == 0o777


def sealed(tmp_path: Path, context: str = "rp-1/hub.tar.enc"):
    from core.sealing import load_or_create_key

    key, _ = load_or_create_key("s", tmp_path / "keys" / "s.restore-key")
    return key, key.stream(context)


def test_an_encrypted_archive_reads_back_and_holds_nothing_in_clear(tmp_path):
    home = odd_home(tmp_path / "home")
    (home / "secret.json").write_text('{"token": "PLAINLY-SECRET-VALUE"}\n')
    key, cipher = sealed(tmp_path)
    members, digest, _ = tarball.write(home, tmp_path / "hub.tar.enc", cipher=cipher)
    raw = (tmp_path / "hub.tar.enc").read_bytes()
    assert b"PLAINLY-SECRET-VALUE" not in raw and b"secret.json" not in raw and b"ustar" not in raw
    assert digest == "sha256:" + hashlib.sha256(raw).hexdigest(), "the digest is of the file as stored"
    found, again = tarball.scan(tmp_path / "hub.tar.enc", "sha256", file_hash=tarball.FILE_HASH, cipher=key.stream("rp-1/hub.tar.enc"))
    assert again == digest
    assert [(m.path, m.digest) for m in found] == [(m.path, m.digest) for m in members]
    out = tmp_path / "out"
    out.mkdir()
    tarball.unpack(tmp_path / "hub.tar.enc", out, "sha256", lambda m: None, cipher=key.stream("rp-1/hub.tar.enc"))
    assert tree(out) == tree(home)


def test_an_encrypted_archive_altered_cut_or_moved_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "db").write_bytes(os.urandom(2 * tarball.CHUNK + 5000))
    key, cipher = sealed(tmp_path)
    tarball.write(home, tmp_path / "a.enc", cipher=cipher)
    good = (tmp_path / "a.enc").read_bytes()
    full = tarball.CHUNK + cipher.overhead
    header = cipher.header_size

    def read(data: bytes, context: str = "rp-1/hub.tar.enc") -> None:
        (tmp_path / "b.enc").write_bytes(data)
        tarball.scan(tmp_path / "b.enc", "sha256", cipher=key.stream(context))

    read(good)
    flipped = bytearray(good)
    flipped[header + full + 100] ^= 1
    with pytest.raises(tarball.ArchiveError, match="encrypted block 1 is not authentic"):
        read(bytes(flipped))
    with pytest.raises(tarball.ArchiveError, match="last sealed block .* is missing"):
        read(good[: header + 2 * full])  # cut after a whole block: the final one is gone
    with pytest.raises(tarball.ArchiveError, match="not authentic"):
        read(good[: header + full] + good[header + 2 * full:])  # a block dropped
    with pytest.raises(tarball.ArchiveError, match="not authentic"):
        read(good, context="rp-2/hub.tar.enc")  # another restore point's archive
    with pytest.raises(tarball.ArchiveError, match="not an archive olab encrypted"):
        read(b"x" * len(good))


def test_an_encrypted_archive_ending_on_a_block_boundary_has_an_empty_last_block(tmp_path):
    # ".", the file's header, its data and the end blocks make exactly 5 MiB (a multiple of
    # both the 1 MiB block and the 10 KiB record): the last sealed block holds no tar at all.
    home = tmp_path / "home"
    home.mkdir()
    (home / "f").write_bytes(os.urandom(5 * tarball.CHUNK - 4 * tarball.BLOCK))
    key, cipher = sealed(tmp_path)
    tarball.write(home, tmp_path / "a.enc", cipher=cipher)
    size = (tmp_path / "a.enc").stat().st_size
    assert size == cipher.header_size + 5 * (tarball.CHUNK + cipher.overhead) + cipher.overhead
    found, _ = tarball.scan(tmp_path / "a.enc", "sha256", file_hash=tarball.FILE_HASH, cipher=key.stream("rp-1/hub.tar.enc"))
    assert [m.path for m in found] == [".", "f"]
    (tmp_path / "b.enc").write_bytes((tmp_path / "a.enc").read_bytes()[: size - cipher.overhead])
    with pytest.raises(tarball.ArchiveError, match="last sealed block"):
        tarball.scan(tmp_path / "b.enc", "sha256", cipher=key.stream("rp-1/hub.tar.enc"))
