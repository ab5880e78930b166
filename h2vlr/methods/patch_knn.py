"""Patch kNN: PatchCore-style nearest-neighbour matching on CLIP patch tokens.

Shapes: ``B`` query images, ``k`` support images, ``L`` feature layers, ``N`` patches
per image, ``M`` memory-bank rows per layer, ``D`` joint embedding width, ``S``
evaluation resolution.

Each feature layer keeps its own memory bank of L2-normalised support patch tokens,
reduced by a greedy k-center coreset when it contains more than ``max_memory`` rows. A
query patch scores ``1 - max cosine`` to its layer's bank; the patch score is the mean
over layers, the map is that score upsampled and smoothed, and the image score is the
maximum patch score (before upsampling).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F

from h2vlr.coreset import greedy_coreset
from h2vlr.maps import patch_scores_to_maps
from h2vlr.methods.base import AnomalyMethod, FitContext, QueryBatch, ScoreOutput
from h2vlr.methods.clip_zeroshot import config_from_options
from h2vlr.methods.registry import register_method

logger = logging.getLogger(__name__)

IMAGE_SCORE_RULE = "max of the patch-level nearest-neighbour distance map"

# Entries of one [queries, bank] similarity block; bounds memory for large banks.
_BLOCK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class PatchKnnConfig:
    """Options of ``patch-knn``."""

    max_memory: int = 10000  # bank rows kept per feature layer; larger pools get a coreset
    sigma: float = 4.0  # Gaussian smoothing of the map, in pixels at resolution S

    def __post_init__(self) -> None:
        if self.max_memory < 1:
            raise ValueError(f"invalid max_memory {self.max_memory}: expected a positive row count")
        if self.sigma < 0:
            raise ValueError(f"invalid sigma {self.sigma}: expected >= 0 pixels")


def nearest_cosine_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Return ``1 - max cosine similarity`` of each query to the rows of ``bank``.

    Args:
        queries: ``[Q, D]`` vectors (any norm).
        bank: ``[M, D]`` vectors (any norm), ``M >= 1``.

    Returns:
        ``[Q]`` float32 distances in ``[0, 2]``.
    """
    if bank.shape[0] == 0:
        raise ValueError("memory bank is empty; the support set must hold at least one image")
    queries = F.normalize(queries.float(), dim=-1)
    bank = F.normalize(bank.float(), dim=-1)
    rows_per_block = max(1, _BLOCK_ELEMENTS // bank.shape[0])
    best = [(block @ bank.T).amax(dim=1) for block in torch.split(queries, rows_per_block, dim=0)]
    return (1.0 - torch.cat(best)).clamp_(0.0, 2.0)


def support_order(paths: list) -> list[int]:
    """Return the positions of ``paths`` sorted by path, so banks ignore the sampler's order."""
    return sorted(range(len(paths)), key=lambda position: str(paths[position]))


def build_memory_bank(patch_tokens: torch.Tensor, max_memory: int, seed: int) -> torch.Tensor:
    """Stack support patch tokens per layer and reduce each layer to a coreset.

    Args:
        patch_tokens: ``[k, L, N, D]`` support patch tokens, in a fixed image order.
        max_memory: rows kept per layer.
        seed: seed of the coreset's first centre.

    Returns:
        ``[L, M, D]`` unit-norm rows with ``M = min(k * N, max_memory)``.
    """
    k, num_layers, num_patches, dim = patch_tokens.shape
    per_layer = F.normalize(patch_tokens.float(), dim=-1).permute(1, 0, 2, 3)
    per_layer = per_layer.reshape(num_layers, k * num_patches, dim)  # [L, k*N, D]
    banks = []
    for layer_tokens in per_layer:
        kept = greedy_coreset(layer_tokens, max_memory, seed=seed)
        banks.append(layer_tokens[kept])
    return torch.stack(banks)


@register_method
class PatchKnn(AnomalyMethod):
    """Nearest-neighbour distance of query patch tokens to a bank of support patch tokens."""

    name = "patch-knn"
    variants = ("full",)
    makes_maps = True
    uses_support = True

    def __init__(self, variant: str = "full", **options: Any) -> None:
        super().__init__(variant, **options)
        self.config = config_from_options(PatchKnnConfig, self.name, options)
        self._bank: torch.Tensor | None = None  # [L, M, D]
        self._image_size = 0

    def fit(self, ctx: FitContext) -> dict[str, float]:
        """Build the per-layer memory banks from the support patch tokens."""
        if len(ctx.support_paths) == 0:
            raise ValueError("patch-knn needs at least one support image; got an empty support set")
        order = support_order(ctx.support_paths)
        tokens = ctx.support_features.patch_tokens[order].to(ctx.device)  # [k, L, N, D]
        pool_rows = tokens.shape[0] * tokens.shape[2]
        self._bank = build_memory_bank(tokens, self.config.max_memory, ctx.seed)
        self._image_size = ctx.backbone.image_size
        logger.info(
            "patch-knn: memory bank of %d rows per layer from %d support patches; image score: %s",
            self._bank.shape[1],
            pool_rows,
            IMAGE_SCORE_RULE,
        )
        return {"memory_rows": float(self._bank.shape[1]), "support_patches": float(pool_rows)}

    def patch_scores(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Return the layer-averaged nearest-neighbour distance ``[B, N]`` of ``[B, L, N, D]`` tokens."""
        if self._bank is None:
            raise RuntimeError("patch-knn.score called before fit; call fit(ctx) first")
        batch, num_layers, num_patches, dim = patch_tokens.shape
        tokens = patch_tokens.to(self._bank.device)
        distances = [
            nearest_cosine_distance(tokens[:, layer].reshape(-1, dim), self._bank[layer])
            for layer in range(num_layers)
        ]
        return torch.stack(distances).mean(dim=0).reshape(batch, num_patches)

    def score(self, batch: QueryBatch) -> ScoreOutput:
        """Score query images by their nearest-neighbour distance map."""
        scores = self.patch_scores(batch.features.patch_tokens)  # [B, N]
        maps = patch_scores_to_maps(
            scores, batch.features.grid_size, self._image_size, sigma=self.config.sigma
        )
        return ScoreOutput(
            image_scores=scores.amax(dim=1).double().cpu().numpy(),
            anomaly_maps=maps.cpu().numpy().astype("float32"),
        )
