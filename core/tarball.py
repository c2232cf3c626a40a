"""olab's restore point archives: plain POSIX tar, written and read in big blocks.

The archives are ordinary ustar files (PAX headers only where ustar cannot
hold a name, a link target or a size), so `tar -xf` unpacks them by hand. What
this module adds over ``tarfile`` is speed and checking, in one pass each way:

- writing reads every file straight into a 1 MiB output block, takes its
  SHA-256 from that block and writes the block out whole; the archive's own
  SHA-256 is taken from the same blocks as they go to disk. Hashing and file
  I/O run without the GIL, so archives written on several threads use every core.
- reading parses the stream in the same big blocks, digests it again, and
  hands each member's data over as memoryviews of the block.
- unpacking only ever creates new entries inside an empty folder: no absolute
  or ``..`` paths, nothing written through a symlink, no hard links or devices.
- setuid, setgid and sticky bits (0o7000) are neither archived (headers and
  members record the mode without them) nor restored (cleared on unpacking,
  whatever an archive says).
- a ``BlockCipher`` (``core.sealing.StreamCipher``) may seal every 1 MiB block
  on its way to disk and open it on the way back: the archive is then no
  longer plain tar, and its digest is over the sealed bytes.

Nothing here knows about sites or manifests; ``tasks/backup.py`` does.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Protocol

BLOCK = 512
RECORD = 20 * BLOCK  # GNU tar pads archives to whole records; so do we
CHUNK = 1 << 20  # a multiple of RECORD's 512-byte blocks
# A cryptographic digest: the manifest that names it is authenticated, so it must bind every byte.
ARCHIVE_HASH = "sha256"
# The mode bits kept: never setuid, setgid or sticky (0o7000), which a restore must not bring back.
MODE_BITS = 0o777
_ZEROS = bytes(RECORD)
_FILE, _DIR, _SYMLINK = b"0", b"5", b"2"
_KIND = {_FILE: "file", b"\0": "file", _DIR: "dir", _SYMLINK: "symlink"}
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class ArchiveError(RuntimeError):
    """An archive or a file that cannot be written or read as olab wrote it."""


@dataclass(slots=True)
class Member:
    """One entry of an archive (or of a folder about to be archived)."""

    path: str  # relative, '/'-separated; "." is the folder itself
    type: str  # "file", "dir" or "symlink"
    mode: int
    mtime_ns: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    digest: str | None = None  # hex, of a file's bytes, by the algorithm its reader or writer was given
    target: str | None = None


class BlockCipher(Protocol):
    """Seals an archive's blocks on the way to disk and opens them on the way back.

    Block i (every one CHUNK bytes of tar, the last one shorter, possibly empty)
    is sealed with its index and whether it is the last; open raises ValueError
    for a block it did not seal so."""

    overhead: int  # bytes a sealed block adds
    header_size: int

    def header(self, block_size: int) -> bytes: ...

    def start(self, header: bytes, block_size: int) -> None: ...

    def seal(self, index: int, block: memoryview, final: bool) -> bytes: ...

    def open(self, index: int, block: bytes, final: bool) -> bytes: ...


# A fast digest of the same bytes, for teardown's read-back check only (did the disk keep
# what was written?): what restore trusts is ARCHIVE_HASH in the authenticated manifest.
READBACK_HASH = "xxh3_128"
# Each file's digest in the manifest: it only names the damaged file when an archive's
# ARCHIVE_HASH does not match (which binds every byte), so a fast one, not a second SHA-256.
FILE_HASH = "xxh3_128"


def new_digest(algorithm: str):
    """A digest object for an algorithm a manifest names (an archive's, or its files')."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == READBACK_HASH:
        import xxhash

        return xxhash.xxh3_128()
    raise ArchiveError(f"unknown hash algorithm {algorithm!r} (this olab knows sha256 and {READBACK_HASH})")


# ---------------------------------------------------------------- headers


def _ustar(name: bytes, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
           link: bytes, prefix: bytes = b"") -> bytes:
    head = b"".join((
        name.ljust(100, b"\0"), b"%07o\0" % mode, b"%07o\0" % uid, b"%07o\0" % gid,
        b"%011o\0" % size, b"%011o\0" % mtime, b"        ", kind, link.ljust(100, b"\0"),
        b"ustar\x0000", bytes(64), b"0000000\0", b"0000000\0", prefix.ljust(155, b"\0"), bytes(12),
    ))
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]


def header(member: Member) -> bytes:
    """The header block(s) of one member: plain ustar when it fits, else PAX."""
    name = member.path + "/" if member.type == "dir" and member.path != "." else member.path
    kind = {"file": _FILE, "dir": _DIR, "symlink": _SYMLINK}[member.type]
    raw_name = os.fsencode(name)
    raw_link = os.fsencode(member.target or "")
    mtime = member.mtime_ns // 1_000_000_000
    small = member.size < 8**11 and member.uid < 8**7 and member.gid < 8**7 and 0 <= mtime < 8**11
    if small and raw_name.isascii() and raw_link.isascii() and len(raw_link) <= 100:
        if len(raw_name) <= 100:
            return _ustar(raw_name, kind, member.mode, member.uid, member.gid, member.size, mtime, raw_link)
        cut = raw_name.rfind(b"/", 0, min(156, len(raw_name) - 1))  # never at a folder's trailing '/'
        if 0 < cut and len(raw_name) - cut - 1 <= 100:
            return _ustar(raw_name[cut + 1:], kind, member.mode, member.uid, member.gid, member.size, mtime,
                          raw_link, raw_name[:cut])
    # Long, non-ASCII or huge: let tarfile write the PAX records (rare, and it knows them all).
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid = kind, member.mode, member.uid, member.gid
    info.size, info.mtime, info.linkname = member.size, mtime, member.target or ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    try:
        while pos < len(data) and data[pos] != 0:
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            if length <= space - pos + 1 or pos + length > len(data) or data[pos + length - 1] != 0x0A:
                raise ValueError
            key, eq, value = data[space + 1:pos + length - 1].partition(b"=")
            if not eq:
                raise ValueError
            records[key.decode("utf-8", "surrogateescape")] = value
            pos += length
    except ValueError:
        raise ArchiveError("a damaged PAX header") from None
    return records


def _pax_int(pax: dict[str, bytes], key: str, default: int) -> int:
    if key not in pax:
        return default
    try:
        value = int(pax[key])
    except ValueError:
        raise ArchiveError(f"a damaged PAX {key} record") from None
    return value


# ---------------------------------------------------------------- streams


class _Sink:
    """An archive being written: a 1 MiB block, filled in place, (sealed,) digested and written whole."""

    def __init__(self, fd: int, cipher: BlockCipher | None = None):
        self.fd = fd
        self.buf = bytearray(CHUNK)
        self.view = memoryview(self.buf)
        self.used = 0
        self.digest = new_digest(ARCHIVE_HASH)
        self.readback = new_digest(READBACK_HASH)
        self.written = 0  # bytes of tar, for the padding to whole records
        self.cipher = cipher
        self.blocks = 0
        if cipher is not None:
            self._out(cipher.header(CHUNK))

    def _out(self, data) -> None:
        self.digest.update(data)
        self.readback.update(data)
        done = 0
        while done < len(data):
            done += os.write(self.fd, data[done:])

    def flush(self, final: bool = False) -> None:
        """Write the block out: full ones as they fill, the last (shorter, maybe empty) with final."""
        data = self.view[: self.used]
        if self.cipher is not None:
            # A reader knows the last block by its being short: every full one is flushed as it fills.
            assert not final or self.used < CHUNK
            self._out(self.cipher.seal(self.blocks, data, final))
            self.blocks += 1
        elif self.used:
            self._out(data)
        self.written += self.used
        self.used = 0

    def put(self, data: bytes) -> None:
        while data:
            take = min(len(data), CHUNK - self.used)
            self.buf[self.used:self.used + take] = data[:take]
            self.used += take
            data = data[take:]
            if self.used == CHUNK:
                self.flush()

    def pad(self) -> None:
        tail = -self.used % BLOCK
        if tail:
            self.put(_ZEROS[:tail])

    def copy_file(self, fd: int, size: int, digest) -> int:
        """Read size bytes of fd into the block, hashing them; returns what was read."""
        left = size
        while left:
            if self.used == CHUNK:
                self.flush()
            room = self.view[self.used: self.used + min(left, CHUNK - self.used)]
            got = os.readv(fd, [room])
            if got == 0:
                break
            digest.update(room[:got])
            self.used += got
            left -= got
        return size - left


class _Source:
    """An archive being read in 1 MiB blocks, digested (and opened) as it goes."""

    def __init__(self, fd: int, digest, cipher: BlockCipher | None = None):
        self.fd = fd
        self.buf = bytearray(CHUNK)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.digest = digest
        self.offset = 0  # of the next unread byte of tar, for messages
        self.cipher = cipher
        self.blocks = 0
        self.ended = False  # the sealed last block was read
        if cipher is not None:
            header = self._read_raw(cipher.header_size)
            try:
                cipher.start(header, CHUNK)
            except ValueError as exc:
                raise ArchiveError(str(exc)) from None

    def _read_raw(self, n: int) -> bytes:
        parts = []
        while n:
            part = os.read(self.fd, n)
            if not part:
                break
            parts.append(part)
            n -= len(part)
        data = b"".join(parts)
        self.digest.update(data)
        return data

    def _fill(self) -> bool:
        if self.cipher is not None:
            return self._fill_sealed()
        got = os.readv(self.fd, [self.view])
        if got:
            self.digest.update(self.view[:got])
        self.start, self.end = 0, got
        return got > 0

    def _fill_sealed(self) -> bool:
        if self.ended:
            self.start = self.end = 0
            return False
        full = CHUNK + self.cipher.overhead
        sealed = self._read_raw(full)
        if len(sealed) < self.cipher.overhead:
            raise ArchiveError(f"the archive ends early: its last sealed block (after block {self.blocks}) is missing")
        # Only the last block is shorter than a full one (the writer flushes every full block at once).
        self.ended = len(sealed) < full
        try:
            plain = self.cipher.open(self.blocks, sealed, self.ended)
        except ValueError as exc:
            raise ArchiveError(str(exc)) from None
        self.blocks += 1
        self.view[: len(plain)] = plain
        self.start, self.end = 0, len(plain)
        return len(plain) > 0

    def take(self, n: int) -> Iterator[memoryview]:
        """The next n bytes, as views into the block (valid until the next call)."""
        while n:
            if self.start == self.end and not self._fill():
                raise ArchiveError(f"the archive ends early at byte {self.offset}")
            part = min(n, self.end - self.start)
            yield self.view[self.start: self.start + part]
            self.start += part
            self.offset += part
            n -= part

    def read(self, n: int) -> bytes:
        return b"".join(bytes(v) for v in self.take(n))

    def skip(self, n: int) -> None:
        for _ in self.take(n):
            pass

    def drain(self) -> None:
        self.start = self.end
        while self._fill():
            pass


def _ns(seconds: bytes) -> int:
    """A PAX time ("1700000000.25") in nanoseconds, exactly (a float would be off by ~100 ns)."""
    try:
        return int(Decimal(seconds.decode("ascii")).scaleb(9).to_integral_value())
    except (ArithmeticError, UnicodeDecodeError, ValueError):
        raise ArchiveError(f"a damaged PAX time {seconds[:40]!r}") from None


def _parse(block: bytes) -> tarfile.TarInfo:
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise ArchiveError(f"a damaged header ({exc})") from None


def members(source: _Source) -> Iterator[tuple[Member, int]]:
    """The members of an archive; each one's data (size bytes, then padding)
    must be taken or skipped from the source before the next is asked for."""
    pax: dict[str, bytes] = {}
    while True:
        block = source.read(BLOCK)
        if block == _ZEROS[:BLOCK]:
            source.drain()  # the end; the rest is padding, digested all the same
            return
        info = _parse(block)
        if info.type == tarfile.XHDTYPE:
            if not 0 <= info.size <= CHUNK:
                raise ArchiveError(f"a damaged PAX header (size {info.size})")
            pax = _pax_records(source.read(info.size + (-info.size % BLOCK))[: info.size])
            continue
        if info.type == tarfile.XGLTYPE:
            if info.size < 0:
                raise ArchiveError("a damaged PAX global header")
            source.skip(info.size + (-info.size % BLOCK))
            continue
        name = pax["path"].decode("utf-8", "surrogateescape") if "path" in pax else info.name
        link = pax["linkpath"].decode("utf-8", "surrogateescape") if "linkpath" in pax else info.linkname
        size = _pax_int(pax, "size", info.size)
        mtime_ns = _ns(pax["mtime"]) if "mtime" in pax else int(info.mtime) * 1_000_000_000
        uid, gid = _pax_int(pax, "uid", info.uid), _pax_int(pax, "gid", info.gid)
        pax = {}
        kind = _KIND.get(info.type)
        if kind is None:
            raise ArchiveError(f"{name}: an entry of a kind olab never writes")
        if size < 0 or uid < 0 or gid < 0 or (kind != "file" and size != 0):
            # tar readers differ on the data of a folder or a link: olab never writes any.
            raise ArchiveError(f"{name}: a damaged header (size {size}, uid {uid}, gid {gid})")
        name = name.rstrip("/") or "."
        if name.startswith("./"):
            name = name[2:] or "."
        yield Member(path=name, type=kind, mode=info.mode, mtime_ns=mtime_ns, uid=uid, gid=gid,
                     size=size if kind == "file" else 0, target=link if kind == "symlink" else None), size


# ---------------------------------------------------------------- writing


def walk(root: Path, include: list[str] | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything below root, parents before children.
    With include, only those paths below root (and what is below them)."""
    for rel, st, _dir_fd, _name in _walk(root, include):
        yield rel, st


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_NOFOLLOW | _O_CLOEXEC


def _walk(root: Path, include: list[str] | None) -> Iterator[tuple[str, os.stat_result, int, str]]:
    """walk, with each entry's folder as an open descriptor and its name in it.

    Every folder is opened relative to its parent's descriptor with O_NOFOLLOW,
    so a folder swapped for a symlink while the walk runs (by a process racing
    the teardown) stops it instead of leading it outside root."""
    for start in include if include is not None else ["."]:
        parent, _, name = (root / start if start != "." else root).as_posix().rpartition("/")
        try:
            top_fd = os.open(parent or "/", _DIR_FLAGS & ~_O_NOFOLLOW)  # root's own path is trusted
        except FileNotFoundError:
            continue
        try:
            try:
                st = os.stat(name, dir_fd=top_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield start, st, top_fd, name
            if stat.S_ISDIR(st.st_mode):
                yield from _walk_folder(top_fd, name, "" if start == "." else start + "/")
        finally:
            os.close(top_fd)


def _walk_folder(parent_fd: int, name: str, rel: str) -> Iterator[tuple[str, os.stat_result, int, str]]:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError:
        raise ArchiveError(f"{rel.rstrip('/') or '.'}: changed while being archived") from None
    try:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        folders = []
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            yield rel + entry.name, st, fd, entry.name
            if stat.S_ISDIR(st.st_mode):
                folders.append(entry.name)
        for sub in folders:
            yield from _walk_folder(fd, sub, rel + sub + "/")
    finally:
        os.close(fd)


def _libc(name: str, *argtypes):
    """A libc function through ctypes (errno kept), or None where libc lacks it."""
    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    call.argtypes = list(argtypes)
    call.restype = ctypes.c_int
    return call


# Linux's sync_file_range: start writing a file back without waiting for it.
_START_WRITEBACK = _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def write(root: Path, archive: Path, include: list[str] | None = None,
          cipher: BlockCipher | None = None, file_hash: str = FILE_HASH) -> tuple[list[Member], str, str]:
    """Archive root (or the listed paths below it) into archive, private (0600),
    every block sealed by cipher when one is given.

    Returns the members (every regular file with its ``file_hash`` digest; modes without
    setuid, setgid and sticky bits), the "sha256:<hex>" digest of the file as
    written, and its "xxh3_128:<hex>" (READBACK_HASH) for the read-back check.
    The archive's writeback to disk is started, not waited for:
    call ``durable`` before relying on it.
    Sockets, fifos and devices are skipped: they are not a student's work.
    """
    found: list[Member] = []
    fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC, 0o600)
    try:
        sink = _Sink(fd, cipher)
        for rel, st, dir_fd, name in _walk(root, include):
            mode = st.st_mode
            member = Member(path=rel, type="dir", mode=stat.S_IMODE(mode) & MODE_BITS, mtime_ns=st.st_mtime_ns,
                            uid=st.st_uid, gid=st.st_gid)
            if stat.S_ISDIR(mode):
                sink.put(header(member))
            elif stat.S_ISLNK(mode):
                try:
                    member.type, member.target = "symlink", os.readlink(name, dir_fd=dir_fd)
                except OSError:
                    raise ArchiveError(f"{rel}: changed while being archived") from None
                sink.put(header(member))
            elif stat.S_ISREG(mode):
                member.type = "file"
                _archive_file(sink, dir_fd, name, member, file_hash)
            else:
                continue
            found.append(member)
        sink.put(_ZEROS[: 2 * BLOCK])
        sink.put(_ZEROS[: -(sink.written + sink.used) % RECORD])
        sink.flush(final=True)
        if _START_WRITEBACK is not None:
            _START_WRITEBACK(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE
    finally:
        os.close(fd)
    return found, f"{ARCHIVE_HASH}:{sink.digest.hexdigest()}", f"{READBACK_HASH}:{sink.readback.hexdigest()}"


def _archive_file(sink: _Sink, dir_fd: int, name: str, member: Member, file_hash: str) -> None:
    try:
        # O_NONBLOCK: a file swapped for a fifo since the walk must not hang the teardown;
        # O_NOFOLLOW: nor one swapped for a symlink lead it elsewhere.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        raise ArchiveError(f"{member.path}: cannot be read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArchiveError(f"{member.path}: changed while being archived")
        member.mode, member.uid, member.gid = stat.S_IMODE(st.st_mode) & MODE_BITS, st.st_uid, st.st_gid
        member.size, member.mtime_ns = st.st_size, st.st_mtime_ns
        digest = new_digest(file_hash)
        sink.put(header(member))
        got = sink.copy_file(fd, st.st_size, digest)
        if got != st.st_size or os.fstat(fd).st_size != st.st_size:
            raise ArchiveError(f"{member.path}: changed size while being archived")
        sink.pad()
        member.digest = digest.hexdigest()
    finally:
        os.close(fd)


def durable(path: Path) -> None:
    """fsync a file or a folder (and nothing else)."""
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNCFS = _libc("syncfs", ctypes.c_int)


def sync_filesystem(path: Path) -> None:
    """Write back everything of the filesystem that holds path (Linux's
    syncfs; elsewhere, every filesystem)."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


# ---------------------------------------------------------------- reading


def scan(archive: Path, algorithm: str, *, file_hash: str | None = None,
         cipher: BlockCipher | None = None) -> tuple[list[Member], str]:
    """Read an archive through (opening every block with cipher, when given): its
    members (with each file's digest by the algorithm ``file_hash``, when given) and
    its "algorithm:hex" digest over every byte of the file."""
    found: list[Member] = []
    fd = os.open(archive, os.O_RDONLY | _O_CLOEXEC)
    try:
        source = _Source(fd, new_digest(algorithm), cipher)
        for member, size in members(source):
            if file_hash and member.type == "file":
                digest = new_digest(file_hash)
                for view in source.take(size):
                    digest.update(view)
                member.digest = digest.hexdigest()
                source.skip(-size % BLOCK)
            else:
                source.skip(size + (-size % BLOCK))
            found.append(member)
    finally:
        os.close(fd)
    return found, f"{algorithm}:{source.digest.hexdigest()}"


def unpack(archive: Path, dest: Path, algorithm: str, expect, *, file_hash: str | None = None,
           cipher: BlockCipher | None = None) -> tuple[list[Member], str]:
    """Unpack archive (opening every block with cipher, when given) into the
    folder dest, creating new entries only.

    ``expect(member)`` is called with each member's header before anything of
    it is written; it may raise to refuse the member, or correct its metadata
    (the manifest keeps mtimes to the nanosecond). Returns the members
    unpacked (with file_hash, each file's digest by that algorithm taken from the bytes
    written) and the archive's digest. Times and (as root) owners are set as
    given, modes without setuid, setgid and sticky bits.
    """
    found: list[Member] = []
    links: set[str] = set()
    dirs: list[Member] = []
    fd = os.open(archive, os.O_RDONLY | _O_CLOEXEC)
    try:
        source = _Source(fd, new_digest(algorithm), cipher)
        for member, size in members(source):
            _contain(member.path, links)
            expect(member)
            path = dest / member.path if member.path != "." else dest
            if member.path != ".":
                _parents(dest, member.path)
            if member.type == "dir":
                if member.path != ".":
                    try:
                        os.mkdir(path, 0o700)
                    except FileExistsError:
                        if path.is_symlink() or not path.is_dir():
                            raise ArchiveError(f"{member.path}: listed twice") from None
                dirs.append(member)
            elif member.type == "symlink":
                os.symlink(member.target, path)
                links.add(member.path)
                if _AS_ROOT:
                    os.lchown(path, member.uid, member.gid)
                os.utime(path, ns=(member.mtime_ns, member.mtime_ns), follow_symlinks=False)
            else:
                member.digest = _unpack_file(source, path, member, size, file_hash)
                source.skip(-size % BLOCK)
            found.append(member)
    finally:
        os.close(fd)
    for member in reversed(dirs):  # children first: setting a folder's time, then writing in it, changes it
        path = dest / member.path if member.path != "." else dest
        if _AS_ROOT:
            os.chown(path, member.uid, member.gid)
        os.chmod(path, member.mode & MODE_BITS)
        os.utime(path, ns=(member.mtime_ns, member.mtime_ns))
    return found, f"{algorithm}:{source.digest.hexdigest()}"


def _contain(name: str, links: set[str]) -> None:
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "" in parts or (name != "." and "." in parts):
        raise ArchiveError(f"archive member {name!r} points outside its folder")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            raise ArchiveError(f"archive member {name!r} would be written through a symlink")


def _parents(dest: Path, name: str) -> None:
    parent = name.rpartition("/")[0]
    if parent and not (dest / parent).is_dir():
        (dest / parent).mkdir(parents=True, mode=0o700, exist_ok=True)


def _unpack_file(source: _Source, path: Path, member: Member, size: int, file_hash: str | None) -> str | None:
    digest = new_digest(file_hash) if file_hash else None
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
    try:
        for view in source.take(size):
            if digest is not None:
                digest.update(view)
            done = 0
            while done < len(view):
                done += os.write(out, view[done:])
        if _AS_ROOT:
            os.fchown(out, member.uid, member.gid)
        os.fchmod(out, member.mode & MODE_BITS)  # after fchown, which may keep setuid as root
        os.utime(out, ns=(member.mtime_ns, member.mtime_ns))
    finally:
        os.close(out)
    return digest.hexdigest() if digest is not None else None
