"""Restore points on disk, without any server: archives, verification, containment,
sealing and encryption, and the runtime folders teardown may delete."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import sqlite3
import stat
import tarfile
from pathlib import Path

import pytest

from core import sealing, tarball
from core.config import load_site
from core.restore_points import ArchiveEntry, FileEntry, Manifest, RestorePoint, choose_restore_point, plan_prune
from core.secrets import SecretStore
from targets.local import LocalPlatform
from tasks import host
from tasks.backup import (
    NotAuthentic,
    VerificationFailed,
    extract_and_verify,
    manifest_bytes,
    read_manifest,
    unpack_and_verify,
    verify_archive,
    verify_restore_point,
    write_archive,
    write_restore_point,
)


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
                                 archive_hash="sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest())


def test_files_carry_a_fast_digest_and_points_written_with_sha256_still_name_a_damaged_file(tmp_path):
    """A file's digest only names the damaged file once the archive's SHA-256 has not matched,
    so it is XXH3-128 (one SHA-256 per byte written, not two); a point written before, whose
    files carry SHA-256 under "sha256", verifies and names a damaged file as it did."""
    import xxhash

    home = make_home(tmp_path / "home")
    entry = write_archive(home, tmp_path / "new.tar", "u")
    assert entry.file_hash == "xxh3_128" and entry.archive_hash.startswith("sha256:")
    by_path = {f.path: f for f in entry.files}
    assert by_path["sub/a.txt"].digest == xxhash.xxh3_128(b"alpha\n").hexdigest()
    assert "digest" in json.loads(entry.model_dump_json())["files"][0]

    # As such a point was written: tarball.write with SHA-256 files, the manifest's old keys.
    members, digest, readback = tarball.write(home, tmp_path / "old.tar", file_hash="sha256")
    old = json.loads(ArchiveEntry(name="u", archive="old.tar", files=[], archive_hash=digest, readback_hash=readback)
                     .model_dump_json(exclude={"file_hash"}))
    old["files"] = [{"path": m.path, "type": m.type, "mode": m.mode, "mtime": m.mtime_ns / 1e9, "mtime_ns": m.mtime_ns,
                     "uid": m.uid, "gid": m.gid, "size": m.size, "sha256": m.digest, "target": m.target} for m in members]
    legacy = ArchiveEntry.model_validate(old)
    assert legacy.file_hash == "sha256"
    assert {f.path: f.digest for f in legacy.files}["sub/a.txt"] == hashlib.sha256(b"alpha\n").hexdigest()
    verify_archive(tmp_path / "old.tar", legacy, "user u", deep=True)
    extract_and_verify(tmp_path / "old.tar", legacy, tmp_path / "out-old", "user u")
    assert (tmp_path / "out-old" / "sub" / "a.txt").read_text() == "alpha\n"
    for name, written in (("new.tar", entry), ("old.tar", legacy)):
        data = bytearray((tmp_path / name).read_bytes())
        data[data.index(b"alpha")] ^= 0x20
        (tmp_path / name).write_bytes(bytes(data))
        with pytest.raises(VerificationFailed, match=r"user u: sub/a.txt: content differs from the manifest \(digest mismatch\)"):
            verify_archive(tmp_path / name, written, "user u")


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


def test_an_archive_of_pythons_tarfile_unpacks_exactly(tmp_path):
    """tarfile's PAX archives (float mtimes in PAX records, as olab wrote before core/tarball.py)
    unpack with their names, modes and times."""

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
    out = tmp_path / "out"
    extract_and_verify(archive, entry, out, "user old")
    assert (out / "latest").read_bytes() == b"kept\n"
    st = (out / "notes" / "ü ber.txt").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime == 1_700_000_000.25
    assert stat.S_IMODE((out / "notes").stat().st_mode) == 0o700


# ---------------------------------------------------------------- sealed restore points

DB_ROW = "DISTINCTIVE-DATABASE-ROW-" + secrets.token_hex(8)


def make_runtime(root: Path) -> tuple[Path, list[str]]:
    """A runtime as the local hub leaves it: a database, the secret store, the state, two homes
    (one with setuid, setgid and sticky bits)."""
    (root / "hub").mkdir(parents=True)
    with sqlite3.connect(root / "hub" / "jupyterhub.sqlite") as db:
        db.execute("create table api_tokens (note text)")
        db.execute("insert into api_tokens values (?)", (DB_ROW,))
    store = SecretStore(root / "secrets" / "secrets.json")
    store.load_or_create()
    (root / "state.json").write_text('{"image": null}\n')
    make_home(root / "homes" / "ann")
    bob = root / "homes" / "bob"
    (bob / "shared").mkdir(parents=True)
    os.chmod(bob / "shared", 0o1777)
    (bob / "tool").write_bytes(b"#!/bin/sh\necho root?\n")
    os.chmod(bob / "tool", 0o4755)
    (bob / "group-tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(bob / "group-tool", 0o2755)
    return root, store.load().values()


def new_key(tmp_path: Path, site: str = "s", name: str = "k") -> sealing.RestoreKey:
    return sealing.load_or_create_key(site, tmp_path / "keys" / f"{name}.restore-key")[0]


@pytest.fixture
def point(tmp_path):
    """A complete, verified restore point of make_runtime's runtime, and its key."""
    runtime, values = make_runtime(tmp_path / "runtime")
    key = new_key(tmp_path)
    where = tmp_path / "backups" / "rp-20261129T190000000000Z-abcdef"
    manifest = write_restore_point.fn(key, runtime, where, ["ann", "bob"], None, None)
    verify_restore_point.fn(where, manifest, key)
    assert (where / "COMPLETE").is_file()
    # Teardown's read-back check uses the fast digest; restore trusts the SHA-256.
    assert all(a.readback_hash.startswith("xxh3_128:") and a.archive_hash.startswith("sha256:")
               for a in [*manifest.users, manifest.hub])
    return where, key, values


def refused_before_unpacking(where: Path, key, match: str, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    with pytest.raises(VerificationFailed, match=match):
        unpack_and_verify.fn(where, staging, key)
    assert not staging.exists(), "nothing of a refused point is left unpacked"


def test_a_sealed_point_restores_and_holds_no_secret_in_clear(point, tmp_path):
    where, key, values = point
    names = sorted(p.relative_to(where).as_posix() for p in where.rglob("*") if p.is_file())
    assert names == ["COMPLETE", "hub.tar.enc", "manifest.json", "manifest.mac", "users/ann.tar", "users/bob.tar"]
    assert len(values) >= 5
    for path in (tmp_path / "backups").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in values:
                assert value.encode() not in data, f"a secret of the hub's store is in clear in {path.name}"
            assert DB_ROW.encode() not in data and b"SQLite format 3" not in data, f"the database is in clear in {path.name}"
    staging = tmp_path / "staging"
    users = unpack_and_verify.fn(where, staging, key)
    assert [u.user for u in users] == ["ann", "bob"] and all(u.verified for u in users)
    runtime = tmp_path / "runtime"
    for rel in ("hub/jupyterhub.sqlite", "secrets/secrets.json", "state.json", "homes/ann/b c.bin"):
        assert (staging / rel).read_bytes() == (runtime / rel).read_bytes()
    assert stat.S_IMODE((staging / "secrets" / "secrets.json").stat().st_mode) == 0o600


def test_setuid_setgid_and_sticky_bits_do_not_come_back(point, tmp_path):
    where, key, _ = point
    bob = {f.path: f.mode for f in read_manifest(where, key).users[1].files}
    assert (bob["tool"], bob["group-tool"], bob["shared"]) == (0o755, 0o755, 0o777)
    unpack_and_verify.fn(where, tmp_path / "staging", key)
    home = tmp_path / "staging" / "homes" / "bob"
    for name, mode in (("tool", 0o755), ("group-tool", 0o755), ("shared", 0o777)):
        assert stat.S_IMODE((home / name).stat().st_mode) == mode, name


def test_a_forged_point_is_refused_before_unpacking_naming_the_manifest(point, tmp_path):
    """Whoever can write the backups rewrites a home and the manifest's hashes to match."""
    where, key, _ = point
    archive = where / "users" / "ann.tar"
    data = bytearray(archive.read_bytes())
    data[data.index(b"alpha\n")] = ord("A")  # same size: only the hashes tell
    archive.write_bytes(bytes(data))
    manifest = json.loads((where / "manifest.json").read_text())
    import xxhash

    for entry in manifest["users"][0]["files"]:
        if entry["path"] == "sub/a.txt":
            entry["digest"] = xxhash.xxh3_128(b"Alpha\n").hexdigest()
    manifest["users"][0]["archive_hash"] = "sha256:" + hashlib.sha256(bytes(data)).hexdigest()
    forged = manifest_bytes(Manifest.model_validate(manifest))
    (where / "manifest.json").write_bytes(forged)
    message = rf"restore point {where.name}: manifest.json is not authenticated by this site's key \(altered, forged, or from another key\)"
    refused_before_unpacking(where, key, message + "$", tmp_path)
    with pytest.raises(NotAuthentic, match=message):
        verify_restore_point.fn(where, Manifest.model_validate(manifest), key)
    # A seal made anew with a key of the forger's own does not help.
    other = new_key(tmp_path, name="forger")
    (where / "manifest.mac").write_bytes(sealing.seal(other, forged))
    refused_before_unpacking(where, key, message + rf": it names key id {other.key_id}", tmp_path)
    (where / "manifest.mac").unlink()
    refused_before_unpacking(where, key, message + ": its seal manifest.mac is missing", tmp_path)


def test_an_altered_home_archive_is_refused_naming_it(point, tmp_path):
    where, key, _ = point
    archive = where / "users" / "ann.tar"
    data = bytearray(archive.read_bytes())
    data[data.index(b"alpha\n")] ^= 0x20
    archive.write_bytes(bytes(data))
    refused_before_unpacking(where, key, rf"restore point {where.name}: users/ann.tar does not match its manifest \(user ann: sub/a.txt: content differs", tmp_path)
    with pytest.raises(VerificationFailed, match="users/ann.tar does not match its manifest"):
        verify_restore_point.fn(where, read_manifest(where, key), key)


def test_a_home_archive_with_a_different_header_is_refused(point, tmp_path):
    """Not only file bytes: a header asking for another mode (or owner) is refused before it is written."""
    where, key, _ = point
    archive = where / "users" / "bob.tar"
    data = bytearray(archive.read_bytes())
    at = next(at for at in range(0, len(data), 512) if data[at:at + 5] == b"tool\0")
    header = data[at:at + 512]
    header[100:108] = b"%07o\0" % 0o4755
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    data[at:at + 512] = header
    archive.write_bytes(bytes(data))
    refused_before_unpacking(where, key, r"users/bob.tar does not match its manifest \(user bob: tool: mode or owner differs", tmp_path)


def test_an_altered_hub_state_archive_is_refused_naming_it(point, tmp_path):
    where, key, _ = point
    archive = where / "hub.tar.enc"
    good = archive.read_bytes()
    for bad in (good[:100] + bytes([good[100] ^ 1]) + good[101:], good[:-16], good + b"\0"):
        archive.write_bytes(bad)
        refused_before_unpacking(where, key, rf"restore point {where.name}: hub.tar.enc does not match its manifest \(hub state: ", tmp_path)
        with pytest.raises(VerificationFailed, match="hub.tar.enc does not match its manifest"):
            verify_restore_point.fn(where, read_manifest(where, key), key)


def test_the_hub_state_of_another_point_is_refused(point, tmp_path):
    where, key, _ = point
    runtime = tmp_path / "runtime"
    other = where.with_name("rp-20261206T190000000000Z-fedcba")
    write_restore_point.fn(key, runtime, other, ["ann"], None, None)
    (where / "hub.tar.enc").write_bytes((other / "hub.tar.enc").read_bytes())
    refused_before_unpacking(where, key, "hub.tar.enc does not match its manifest", tmp_path)
    # Nor may a whole point pass for another: its manifest names its own id.
    (where / "manifest.json").write_bytes((other / "manifest.json").read_bytes())
    (where / "manifest.mac").write_bytes((other / "manifest.mac").read_bytes())
    refused_before_unpacking(where, key, f"is sealed for s's {other.name}, not for this point", tmp_path)


def test_a_point_sealed_with_another_key_is_refused(point, tmp_path):
    where, key, _ = point
    for stranger in (new_key(tmp_path, name="other"),  # another key of the same site
                     sealing.RestoreKey(site="t", path=key.path, secret=key.secret)):  # the same bytes, another site
        refused_before_unpacking(where, stranger, "manifest.json is not authenticated by this site's key", tmp_path)


def test_a_point_written_before_sealing_is_refused_saying_why(point, tmp_path):
    where, key, _ = point
    manifest = json.loads((where / "manifest.json").read_text())
    manifest["schema_version"] = 2
    (where / "manifest.json").write_text(json.dumps(manifest))
    (where / "manifest.mac").unlink()
    refused_before_unpacking(where, key, rf"restore point {where.name} was written before olab sealed restore points "
                                         r"\(schema 2, no manifest.mac\).*if you trust it, unpack it by hand", tmp_path)


def test_the_restore_key_is_private_and_made_once(tmp_path):
    key, created = sealing.load_or_create_key("s", tmp_path / "keys" / "s.restore-key")
    again, created_again = sealing.load_or_create_key("s", tmp_path / "keys" / "s.restore-key")
    assert created and not created_again and again.secret == key.secret and len(key.secret) == 32
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.path.parent.stat().st_mode) == 0o700
    assert os.listdir(key.path.parent) == ["s.restore-key"]
    os.chmod(key.path, 0o644)
    with pytest.raises(sealing.KeyUnusable, match="chmod 600"):
        sealing.load_key("s", key.path)
    os.chmod(key.path, 0o600)
    key.path.write_text("not a key\n")
    with pytest.raises(sealing.KeyUnusable, match="not an olab restore key"):
        sealing.load_key("s", key.path)


# ---------------------------------------------------------------- the local target's own folders


@pytest.fixture
def local(make_site):
    """A local site (no hub) whose runtime olab made: (site, platform)."""
    def make(name: str, **sections) -> tuple:
        site = load_site(str(make_site(name, **sections)))
        return site, LocalPlatform(site)
    return make


def test_a_missing_key_is_named_where_it_was_expected(local, olab_home):
    site, platform = local("nokey")
    with pytest.raises(sealing.KeyMissing, match=rf"restore point rp-1 cannot be checked: site nokey's restore key is missing: expected at {olab_home}/keys/nokey.restore-key"):
        platform.bring_back_user_data("rp-1")


def test_teardown_makes_the_key_outside_the_backups_or_refuses(local, olab_home):
    site, platform = local("keyed")
    host.claim_runtime(site)
    platform.check_backup_room(0)
    assert sealing.key_path("keyed").is_file() and not sealing.key_path("keyed").is_relative_to(site.paths.backups)
    site, platform = local("keyinside", backups={"path": str(olab_home)})
    host.claim_runtime(site)
    with pytest.raises(sealing.KeyUnusable, match="would lie inside the backups folder"):
        platform.check_backup_room(0)
    assert not sealing.key_path("keyinside").exists()


def test_release_deletes_only_a_runtime_olab_marked_for_the_site(local):
    site, platform = local("mine")
    runtime = site.paths.runtime
    (runtime / "homes" / "ann").mkdir(parents=True)
    (runtime / "homes" / "ann" / "work.txt").write_text("kept\n")
    with pytest.raises(host.NotOurs, match=rf"runtime folder {runtime} has no olab mark \(.olab-runtime\): olab did not make it"):
        platform.release_runtime()
    with pytest.raises(host.NotOurs, match="has no olab mark"):
        platform.check_backup_room(0)  # the teardown's preflight: before anything is stopped
    assert (runtime / "homes" / "ann" / "work.txt").read_text() == "kept\n"
    (runtime / ".olab-runtime").write_text('{"site": "theirs", "id": "x"}\n')
    with pytest.raises(host.NotOurs, match="is marked as site theirs's, not mine's"):
        platform.release_runtime()
    assert (runtime / "homes" / "ann" / "work.txt").is_file()
    (runtime / ".olab-runtime").unlink()
    host.claim_runtime(site)  # all in it is olab's: a site made before runtimes were marked
    mark = json.loads((runtime / ".olab-runtime").read_text())
    assert mark["site"] == "mine" and len(mark["id"]) == 32
    assert stat.S_IMODE((runtime / ".olab-runtime").stat().st_mode) == 0o600
    platform.release_runtime()
    assert not runtime.exists() and not runtime.with_name("runtime.deleting").exists()


def test_a_folder_with_what_olab_never_puts_there_is_not_taken(local):
    site, platform = local("foreign")
    runtime = site.paths.runtime
    (runtime / "hub").mkdir(parents=True)
    (runtime / "thesis.tex").write_text("not olab's\n")
    with pytest.raises(host.NotOurs, match=r"holds 'thesis.tex', which olab never puts there"):
        host.claim_runtime(site)
    assert not (runtime / ".olab-runtime").exists()
    checks = host.prepare_local_host.fn(site)
    assert [(c.name, c.ok) for c in checks] == [("runtime folder", False)], "provision makes nothing there"
    assert sorted(os.listdir(runtime)) == ["hub", "thesis.tex"]


def test_a_deletion_cut_short_is_finished_only_when_it_was_olabs(local):
    site, platform = local("cut")
    runtime = site.paths.runtime
    doomed = runtime.with_name("runtime.deleting")
    host.claim_runtime(site)
    (runtime / "homes" / "ann").mkdir(parents=True)
    os.replace(runtime, doomed)  # killed after the rename, before the deletion
    platform.release_runtime()
    assert not doomed.exists()
    (doomed / "data").mkdir(parents=True)  # something else by that name, not olab's
    with pytest.raises(host.NotOurs, match="runtime.deleting has no olab mark"):
        platform.release_runtime()
    assert (doomed / "data").is_dir()


def test_backups_inside_equal_to_or_holding_the_runtime_are_refused(local, tmp_path):
    # make_site puts a site's runtime at tmp_path/<name>/runtime.
    for name, where in (("inside", "runtime/backups"), ("equal", "runtime"), ("holding", "."), ("staged", "runtime.restoring/b")):
        folder = tmp_path / name / where
        site, platform = local(name, backups={"path": str(folder)})
        host.claim_runtime(site)
        with pytest.raises(host.NotOurs, match=f"backups.path {folder} (lies in|holds the runtime)"):
            platform.check_backup_room(0)
    # Through a symlink too.
    link = tmp_path / "linked-backups"
    link.symlink_to(tmp_path / "linked" / "runtime", target_is_directory=True)
    site, platform = local("linked", backups={"path": str(link / "backups")})
    host.claim_runtime(site)
    with pytest.raises(host.NotOurs, match="lies in the runtime folder"):
        platform.check_backup_room(0)
    assert list(site.paths.runtime.iterdir()) == [site.paths.runtime / ".olab-runtime"], "nothing made in it"


def test_a_restored_runtime_carries_the_mark(point, local, tmp_path):
    where, key, _ = point
    site, platform = local("restored")
    unpack_and_verify.fn(where, host.staging_dir(site), key)
    host.claim_runtime(site)
    (site.paths.runtime / "old").mkdir()
    host.swap_in(site)
    assert host.read_runtime_mark(site.paths.runtime) == "restored"
    assert (site.paths.runtime / "homes" / "ann" / "sub" / "a.txt").read_text() == "alpha\n"
    assert not (site.paths.runtime / "old").exists()
    # A runtime something else made meanwhile (olab serve's log after the teardown) is not swapped away.
    unpack_and_verify.fn(where, host.staging_dir(site), key)
    (site.paths.runtime / ".olab-runtime").unlink()
    with pytest.raises(host.NotOurs, match="exists without site restored's mark: something wrote there since the teardown"):
        host.swap_in(site)
    assert (site.paths.runtime / "homes").is_dir()
