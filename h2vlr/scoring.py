"""Scores from refined nodes: semantic probability, visual deviation, maps, image score.

Shapes: ``B`` images, ``L`` feature layers, ``N`` query patches, ``Ns`` support patches,
``C`` concepts (the first ``num_normal`` are normal), ``H`` node width, ``S`` evaluation
resolution.

- ``p_abn``: softmax over ``concept_scale * cos(patch, concept)``, summed over the
  abnormal concepts.
- deviation: ``1 - max cos(query patch, support patch)``, clipped to ``[0, 1]``.
- patch score: ``alpha * p_abn + (1 - alpha) * deviation``, averaged over layers.
- map: bilinear upsampling to ``S x S`` and Gaussian smoothing (``h2vlr.maps``).
- image score: ``w * max(map) + (1 - w) * p_global``, with ``p_global`` the ``p_abn`` of
  the global image embedding against the unrefined concepts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from h2vlr.maps import patch_scores_to_maps
from h2vlr.reasoning import RefinedNodes


def concept_similarity(nodes: Tensor, concepts: Tensor) -> Tensor:
    """Cosine of every node to every concept: ``[..., P, H] x [..., C, H] -> [..., P, C]``."""
    return F.normalize(nodes, dim=-1) @ F.normalize(concepts, dim=-1).transpose(-1, -2)


def abnormal_probability(similarity: Tensor, num_normal: int, scale: float) -> Tensor:
    """Softmax over ``scale * similarity`` (last axis ``C``), summed over abnormal concepts."""
    return torch.softmax(scale * similarity, dim=-1)[..., num_normal:].sum(dim=-1)


def best_similarities(similarity: Tensor, num_normal: int) -> tuple[Tensor, Tensor]:
    """Return ``s_n`` and ``s_a``: the best cosine to a normal and to an abnormal concept."""
    return (
        similarity[..., :num_normal].max(dim=-1).values,
        similarity[..., num_normal:].max(dim=-1).values,
    )


def visual_deviation(query: Tensor, support: Tensor) -> Tensor:
    """``1 - max`` cosine of each query patch to the support patches, clipped to ``[0, 1]``.

    Args:
        query: ``[..., N, H]``.
        support: ``[..., Ns, H]`` with the same leading axes.

    Returns:
        ``[..., N]``.
    """
    cosine = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(-1, -2)
    return (1.0 - cosine.max(dim=-1).values).clamp(0.0, 1.0)


def layer_patch_scores(
    refined: RefinedNodes, num_normal: int, alpha: float, scale: float
) -> Tensor:
    """Fuse semantic probability and visual deviation per layer: ``[B, L, N]`` in ``[0, 1]``."""
    similarity = concept_similarity(refined.query, refined.concepts)  # [B, L, N, C]
    p_abn = abnormal_probability(similarity, num_normal, scale)
    deviation = visual_deviation(refined.query, refined.support)
    return alpha * p_abn + (1.0 - alpha) * deviation


def patch_scores(refined: RefinedNodes, num_normal: int, alpha: float, scale: float) -> Tensor:
    """Average the fused patch scores over layers: ``[B, N]`` in ``[0, 1]``."""
    return layer_patch_scores(refined, num_normal, alpha, scale).mean(dim=1)


def global_probability(
    global_embeds: Tensor, concepts: Tensor, num_normal: int, scale: float
) -> Tensor:
    """``p_abn`` of ``[B, D]`` global image embeddings against ``[C, D]`` concepts: ``[B]``."""
    return abnormal_probability(concept_similarity(global_embeds, concepts), num_normal, scale)


def anomaly_maps_and_scores(
    scores: Tensor,
    global_p: Tensor,
    grid_size: tuple[int, int],
    size: int,
    sigma: float,
    image_score_weight: float,
) -> tuple[Tensor, Tensor]:
    """Turn patch scores into ``[B, S, S]`` maps and ``[B]`` image scores.

    Args:
        scores: ``[B, N]`` fused patch scores in ``[0, 1]``.
        global_p: ``[B]`` abnormal probability of the global embeddings.
        grid_size: ``(gh, gw)`` of the patch grid.
        size: evaluation resolution ``S``.
        sigma: Gaussian smoothing in pixels.
        image_score_weight: weight of the map maximum in the image score.
    """
    maps = patch_scores_to_maps(scores, grid_size, size, sigma)
    peak = maps.flatten(1).max(dim=1).values
    image = image_score_weight * peak + (1.0 - image_score_weight) * global_p
    return maps, image
