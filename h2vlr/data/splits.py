"""Deterministic split of normal images for datasets without a training split.

MTD, BrainMRI, Br35H, HeadCT and the generic folder layout ship their normal images
in one directory. The rule: order the normal images by the SHA-256 digest of their
relative path (posix form, UTF-8), then put the first ``n // 2`` into the support pool
and the remaining ``n - n // 2`` into the test split. The split depends only on the
relative paths, so it is the same for every shot and seed, and it does not depend on
the order in which the file system lists the files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from h2vlr.data.types import Sample

# Share of the normal images that goes to the support pool (rounded down).
SUPPORT_POOL_FRACTION = 0.5


def stable_digest(*parts: str) -> str:
    """Return the hex SHA-256 of ``parts`` joined by NUL; unlike ``hash()``, stable across processes."""
    joined = "\0".join(parts).encode("utf-8")
    return hashlib.sha256(joined).hexdigest()


def split_normals(normals: Sequence[Sample]) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    """Split normal images into a support pool and test normals by hash order.

    Args:
        normals: Normal images of one category, in any order.

    Returns:
        ``(support_pool, test_normals)``, each sorted by ``rel_path``; the pool contains
        ``floor(n * SUPPORT_POOL_FRACTION)`` images.
    """
    ordered = sorted(normals, key=lambda s: (stable_digest(s.rel_path), s.rel_path))
    pool_size = int(len(ordered) * SUPPORT_POOL_FRACTION)
    pool = sorted(ordered[:pool_size], key=lambda s: s.rel_path)
    test = sorted(ordered[pool_size:], key=lambda s: s.rel_path)
    return tuple(pool), tuple(test)
