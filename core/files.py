"""Small, safe file primitives: atomic writes, private files, content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644) -> None:
    """Write a file so that readers see the old or the new content, never half.

    The temporary file is created with ``mode`` from the start, so a private
    file is never readable by others, not even for a moment.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: Path, value: object, *, mode: int = 0o644) -> None:
    atomic_write(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", mode=mode)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_files(root: Path, ignore: Iterable[str] = ("__pycache__", ".ipynb_checkpoints")) -> list[Path]:
    """Regular files below ``root``, sorted, skipping caches."""
    skip = set(ignore)
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        found.extend(Path(folder) / f for f in sorted(files))
    return found


def content_hash(entries: Iterable[tuple[str, bytes]]) -> str:
    """One hash over named pieces of content; order-independent by name."""
    digest = hashlib.sha256()
    for name, data in sorted(entries):
        digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0")
        digest.update(data)
    return digest.hexdigest()
