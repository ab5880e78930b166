"""Locations on disk shared by the package."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "H2VLR_CACHE_DIR"


def default_cache_dir() -> Path:
    """Return ``$H2VLR_CACHE_DIR`` if set, else ``~/.cache/h2vlr-bench``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "h2vlr-bench"
