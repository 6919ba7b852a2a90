"""Writes that never leave a half-written file, and small file helpers every stage shares.

A file is written to a temporary file in the same directory, fsynced, renamed onto its name, and the
directory is fsynced: a process killed at any moment leaves either the old file or the new one. This
module sits below every other (config, checkpoint, sample, assemble, status) and imports none of them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync it, rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) onto ``path`` atomically."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# (resolved path, device, inode, size, mtime_ns) -> sha256 of the files :func:`file_sha256_once` hashed
_SHA256_SEEN: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256_once(path: str | Path) -> str:
    """:func:`file_sha256`, remembered for the life of the process while the file stays the same (same inode,
    size and mtime): a task that names one checkpoint several times (resolving ``sampling.checkpoint: best``,
    then sampling from it) reads a 1 GB file once. A file replaced (atomic writes: a new inode) or rewritten is
    hashed again."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA256_SEEN:
        _SHA256_SEEN[key] = file_sha256(path)
    return _SHA256_SEEN[key]


def new_dir(parent: Path) -> Path:
    """A new, empty ``parent/<YYYYmmdd-HHMMSS>[-i]`` directory (never one that exists)."""
    stamp, i = time.strftime("%Y%m%d-%H%M%S"), 0
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        dest = parent / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            dest.mkdir()
            return dest
        except FileExistsError:
            i += 1
