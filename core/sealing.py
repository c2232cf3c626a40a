"""Restore points that cannot be forged or leak: the site's restore key and what it seals.

Every local site has one restore key: 32 random bytes, made the first time a
teardown needs it, kept at ``$OLAB_HOME/keys/<site>.restore-key`` (one line of
64 hex digits, mode 0600, in a 0700 folder), never inside the site's backups
folder nor its runtime folder. Two keys are derived from it with HKDF-SHA256,
under distinct labels that also name the site:

- the MAC key: ``manifest.mac`` holds an HMAC-SHA256 of ``manifest.json``'s
  exact bytes. The manifest names every archive's SHA-256 and every file's, so
  nothing of a restore point can be changed, or a point made up, without the key;
- the encryption key: the hub's state (its database, the secret store, the site
  state) is stored as AES-256-GCM, in sealed blocks (see ``StreamCipher``).
  User homes stay plain tar (``tar -xf`` unpacks them without olab or the key).

Keeping the key safe
--------------------
Without the key no restore point of the site can be restored by olab, and
with it anyone who can also write the backups folder can forge one. So:

- keep one copy off this machine, e.g. in the course's password manager, as
  soon as the first teardown made it (it logs "created this site's restore key")::

      cat "$OLAB_HOME/keys/<site>.restore-key"     # ~/.olab when OLAB_HOME is unset

  and store that line with the site's name and the key id the log names;
- never copy it into the backups folder, nor onto the disk or bucket the
  backups are copied to;
- to put it back (a new machine, a lost home folder), paste the line into::

      (umask 077; mkdir -p "$OLAB_HOME/keys"; cat > "$OLAB_HOME/keys/<site>.restore-key")

If the key is lost, the homes in its restore points can still be unpacked by
hand (``tar -xf users/<name>.tar``); the hub's state in them cannot. A key that
leaked: move it away; the next teardown makes a new one (keep the old one until
the points it sealed are pruned: only it opens them).
"""

from __future__ import annotations

import hmac
import json
import os
import secrets as _random
import stat
import struct
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from core.config import Site, olab_home

KEY_BYTES = 32
KEY_SUFFIX = ".restore-key"
MAC_SCHEME = "hmac-sha256-v1"
CIPHER_SCHEME = "aes-256-gcm-stream-v1"
_LABEL = b"olab restore point v1"
_MAGIC = b"OLAB-AES"  # the first bytes of an encrypted archive
_TAG = 16
_SALT = 32


class KeyMissing(FileNotFoundError):
    """The site's restore key is not where olab keeps it (a restore cannot go on without it)."""


class KeyUnusable(PermissionError):
    """A restore key olab will not use: readable by others, malformed, or in the wrong place."""


class SealBroken(ValueError):
    """Sealed bytes this key did not seal: altered, forged, truncated, or from another key."""


def key_path(site: str) -> Path:
    return olab_home() / "keys" / f"{site}{KEY_SUFFIX}"


@dataclass(frozen=True)
class RestoreKey:
    site: str
    path: Path
    secret: bytes = field(repr=False)

    def derive(self, purpose: bytes, salt: bytes | None = None) -> bytes:
        """A 32-byte key for one purpose (HKDF-SHA256: the label names the purpose and the site)."""
        info = b"\0".join((_LABEL, purpose, self.site.encode()))
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(self.secret)

    @property
    def key_id(self) -> str:
        """Names the key (not secret): to match a restore point to the copy an operator kept."""
        return self.derive(b"key id")[:8].hex()

    def mac(self, data: bytes) -> str:
        return hmac.new(self.derive(b"manifest mac"), data, sha256).hexdigest()

    def stream(self, context: str) -> StreamCipher:
        """The cipher of one archive; context (its restore point and name) is bound into its key."""
        return StreamCipher(self, context)


def _read_key(site: str, path: Path) -> RestoreKey:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise KeyMissing(
            f"site {site}'s restore key is missing: expected at {path}; without it no restore point of the site "
            "can be checked or opened: put back the copy you kept (README: 'Keeping the restore key safe')"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyUnusable(f"{path}: the restore key must be a plain file")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeyUnusable(f"{path}: restore key has mode {stat.S_IMODE(st.st_mode):04o}; run chmod 600 on it")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != KEY_BYTES:
        raise KeyUnusable(f"{path}: not an olab restore key (one line of {2 * KEY_BYTES} hex digits)")
    return RestoreKey(site=site, path=path, secret=secret)


def load_key(site: str, path: Path | None = None) -> RestoreKey:
    """The site's key as kept; KeyMissing when it is not there (never made anew: old points need the old one)."""
    return _read_key(site, path or key_path(site))


def load_or_create_key(site: str, path: Path | None = None) -> tuple[RestoreKey, bool]:
    """The site's key, made on first need: (key, whether it was made now)."""
    path = path or key_path(site)
    if os.path.lexists(path):
        return _read_key(site, path), False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{_random.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(_random.token_bytes(KEY_BYTES).hex() + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)  # never over a key another process made meanwhile
            created = True
        except FileExistsError:
            created = False
    finally:
        os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return _read_key(site, path), created


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_place(site: Site, path: Path) -> None:
    if _inside(path, site.paths.backups):
        raise KeyUnusable(
            f"restore key {path} would lie inside the backups folder {site.paths.backups}, where whoever "
            "can write the backups could read it and forge restore points; move backups.path elsewhere"
        )
    if _inside(path, site.paths.runtime):
        raise KeyUnusable(f"restore key {path} would lie inside the runtime folder {site.paths.runtime}, which teardown deletes")


def site_key(site: Site) -> RestoreKey:
    """The key that opens the site's restore points (refused inside its backups or runtime folder)."""
    path = key_path(site.name)
    _check_place(site, path)
    return load_key(site.name, path)


def ensure_site_key(site: Site) -> tuple[RestoreKey, bool]:
    """The key a teardown seals with, made on first need: (key, whether it was made now)."""
    path = key_path(site.name)
    _check_place(site, path)
    return load_or_create_key(site.name, path)


# ---------------------------------------------------------------- the manifest's seal


def seal(key: RestoreKey, data: bytes) -> bytes:
    """What ``manifest.mac`` holds for a manifest's exact bytes."""
    return (json.dumps({"scheme": MAC_SCHEME, "key_id": key.key_id, "mac": key.mac(data)}, sort_keys=True) + "\n").encode()


def check_seal(key: RestoreKey, data: bytes, sealed: bytes) -> None:
    """Raise SealBroken unless ``sealed`` is this key's MAC of exactly ``data``."""
    try:
        record = json.loads(sealed)
        scheme, mac, key_id = record["scheme"], record["mac"], record.get("key_id")
    except (ValueError, TypeError, KeyError):
        raise SealBroken("its seal is unreadable") from None
    if scheme != MAC_SCHEME or not isinstance(mac, str):
        raise SealBroken(f"its seal is of an unknown kind ({str(scheme)[:40]!r})")
    if not hmac.compare_digest(mac.encode(), key.mac(data).encode()):
        if isinstance(key_id, str) and key_id != key.key_id:
            # Only a hint (an attacker can write any id): which key sealed it, if olab did.
            raise SealBroken(f"it names key id {key_id[:16]}; this site's key ({key.path}) is {key.key_id}")
        raise SealBroken("")


# ---------------------------------------------------------------- encrypted archives


class StreamCipher:
    """AES-256-GCM over an archive's 1 MiB blocks, as ``core.tarball`` writes and reads them.

    Streamed, not encrypted whole: the hub's database grows with every user and
    token, so it is not bounded small. The file starts with a header (magic,
    block size, a random 32-byte salt); the archive's own key is derived from
    the restore key with that salt and the archive's context (restore point and
    name), so no two archives share a key. Block i is sealed with nonce
    (i, final flag): the STREAM construction, so blocks cannot be reordered,
    dropped or moved to another archive, and a file cut after any whole block
    lacks its final one. The header is every block's associated data.
    """

    scheme = CIPHER_SCHEME
    overhead = _TAG
    header_size = len(_MAGIC) + 4 + _SALT

    def __init__(self, key: RestoreKey, context: str):
        self._key = key
        self._context = context.encode("utf-8", "surrogateescape")
        self._aead: AESGCM | None = None
        self._header = b""

    def _start(self, header: bytes) -> None:
        salt = header[len(_MAGIC) + 4:]
        self._aead = AESGCM(self._key.derive(b"hub state encryption\0" + self._context, salt))
        self._header = header

    def header(self, block_size: int) -> bytes:
        """A new header (fresh salt) for an archive about to be written."""
        header = _MAGIC + struct.pack(">I", block_size) + _random.token_bytes(_SALT)
        self._start(header)
        return header

    def start(self, header: bytes, block_size: int) -> None:
        """Read an archive that begins with header."""
        if len(header) != self.header_size or not header.startswith(_MAGIC):
            raise SealBroken("not an archive olab encrypted")
        if struct.unpack(">I", header[len(_MAGIC):len(_MAGIC) + 4])[0] != block_size:
            raise SealBroken("encrypted in blocks of another size")
        self._start(header)

    @staticmethod
    def _nonce(index: int, final: bool) -> bytes:
        return index.to_bytes(11, "big") + (b"\1" if final else b"\0")

    def seal(self, index: int, block, final: bool) -> bytes:
        assert self._aead is not None, "header() first"
        return self._aead.encrypt(self._nonce(index, final), block, self._header)

    def open(self, index: int, block: bytes, final: bool) -> bytes:
        assert self._aead is not None, "start() first"
        try:
            return self._aead.decrypt(self._nonce(index, final), block, self._header)
        except InvalidTag:
            raise SealBroken(f"encrypted block {index} is not authentic (altered, truncated, or from another key)") from None
