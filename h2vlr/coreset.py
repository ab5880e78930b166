"""Greedy k-center coreset selection, shared by the memory banks of every method.

The greedy k-center rule (Gonzalez, 1985) starts from one point and repeatedly adds
the point farthest from everything chosen so far. The chosen set covers the pool with
a radius at most twice the optimal one. PatchCore (Roth et al., CVPR 2022) uses it to
shrink a bank of patch features; here it bounds the support patches that a method
keeps. Distances are Euclidean on the features as given: callers that compare by
cosine should L2-normalise first, which makes the two orders agree.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def greedy_coreset(features: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Select ``n`` rows of ``features`` by greedy k-center (farthest-point) selection.

    The first centre is drawn uniformly with a generator seeded by ``seed``. Every later
    choice is deterministic, with ties going to the lowest index, so one seed always
    returns the same indices for the same features.

    Args:
        features: ``[M, D]`` pool of feature vectors (any floating dtype and device).
        n: number of rows to keep; ``n >= M`` keeps every row.
        seed: seed of the first centre.

    Returns:
        ``[n']`` int64 indices into ``features`` on its device, with ``n' = min(n, M)``,
        in the order they were chosen. When ``n >= M`` they are ``0 .. M-1`` in order.

    Raises:
        ValueError: if ``features`` is not two-dimensional or ``n`` is negative.
    """
    if features.dim() != 2:
        raise ValueError(
            f"features must be a [M, D] matrix, got shape {tuple(features.shape)}; "
            "flatten the patch axes first, e.g. features.reshape(-1, D)"
        )
    if n < 0:
        raise ValueError(f"coreset size n must be >= 0, got {n}")
    num_rows = features.shape[0]
    device = features.device
    if n >= num_rows:
        return torch.arange(num_rows, dtype=torch.long, device=device)
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=device)

    pool = features.detach().float()
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(num_rows, (1,), generator=generator).item())

    chosen = torch.empty(n, dtype=torch.long, device=device)
    chosen[0] = first
    # Squared distance of every row to its nearest chosen centre so far. Chosen rows hold
    # -1, so duplicates of a centre (distance 0) are still picked before them.
    squared_norms = pool.pow(2).sum(dim=1)  # [M]
    nearest = _squared_distances(pool, squared_norms, first)
    nearest[first] = -1.0
    for step in range(1, n):
        # argmax returns the first maximal index, which keeps ties deterministic.
        candidate = int(torch.argmax(nearest).item())
        chosen[step] = candidate
        nearest = torch.minimum(nearest, _squared_distances(pool, squared_norms, candidate))
        nearest[candidate] = -1.0

    logger.debug("greedy coreset kept %d of %d rows (seed %d)", n, num_rows, seed)
    return chosen


def _squared_distances(
    pool: torch.Tensor, squared_norms: torch.Tensor, centre_index: int
) -> torch.Tensor:
    """Return ``[M]`` squared Euclidean distances of the ``[M, D]`` pool rows to one row.

    Uses ``|x|^2 - 2 x.c + |c|^2``: one matrix-vector product and no ``[M, D]`` temporary.
    Rounding can make the result slightly negative, hence the clamp.
    """
    centre = pool[centre_index]
    return (squared_norms - 2.0 * (pool @ centre) + squared_norms[centre_index]).clamp_min_(0.0)
