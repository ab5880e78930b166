"""Locations on disk shared by the package."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

CACHE_DIR_ENV = "H2VLR_CACHE_DIR"


def default_cache_dir() -> Path:
    """Return ``$H2VLR_CACHE_DIR`` if set, else ``~/.cache/h2vlr-bench``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "h2vlr-bench"


def file_sha256(path: Path) -> str:
    """Return the sha256 hex digest of a file's bytes, memoised per (path, size, mtime)."""
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime_ns are part of the memo key so that a rewritten file is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
