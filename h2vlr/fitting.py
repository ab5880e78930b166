"""Few-shot fitting: patch labels from view masks, the alignment losses and the step loop.

Shapes: ``V`` training views, ``L`` feature layers, ``N`` patches, ``C`` concepts (the
first ``num_normal`` normal), ``S`` view resolution, ``D`` embedding width.

The margin loss requires of a normal patch ``s_n - s_a >= m`` and an anomalous one for
``s_a - s_n >= m``, where ``s_n`` and ``s_a`` are its best cosine to a normal and to an
abnormal concept: ``max(0, m - (s_n - s_a))`` and ``max(0, m - (s_a - s_n))``. The same
applies to the global embedding of each view with the view's label. Each term is the
mean over normal and the mean over anomalous items, averaged, so the rare anomalous
patches weigh as much as the normal ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from h2vlr.config import H2VLRConfig
from h2vlr.features import Features
from h2vlr.hypergraph import SupportBank
from h2vlr.reasoning import GraphSettings, HypergraphReasoner, refine
from h2vlr.scoring import (
    abnormal_probability,
    best_similarities,
    concept_similarity,
    layer_patch_scores,
)

logger = logging.getLogger(__name__)


def patch_labels(masks: Tensor, grid_size: tuple[int, int], threshold: float) -> Tensor:
    """Label a patch anomalous when at least ``threshold`` of its pixels are in the mask.

    Args:
        masks: ``[V, S, S]`` bool.
        grid_size: ``(gh, gw)``.
        threshold: mask fraction in ``[0, 1]``; 0 marks any patch that touches the mask.

    Returns:
        ``[V, gh * gw]`` float 0/1, row-major.
    """
    fraction = F.adaptive_avg_pool2d(masks.float().unsqueeze(1), grid_size).flatten(1)
    if threshold == 0:
        return (fraction > 0).float()
    return (fraction >= threshold).float()


def _balanced_mean(values: Tensor, labels: Tensor) -> Tensor:
    """Average of the mean over label-0 and the mean over label-1 items (present classes)."""
    terms = [values[labels == cls].mean() for cls in (0.0, 1.0) if bool((labels == cls).any())]
    return torch.stack(terms).mean()


def margin_loss(similarity: Tensor, labels: Tensor, num_normal: int, margin: float) -> Tensor:
    """Class-balanced hinge on ``s_n - s_a`` (normal) or ``s_a - s_n`` (anomalous).

    Args:
        similarity: ``[..., C]`` cosines to the concepts.
        labels: ``[...]`` float 0/1.
        num_normal: number of normal concepts (the first ones).
        margin: ``m`` in cosine units.
    """
    s_n, s_a = best_similarities(similarity, num_normal)
    gap = torch.where(labels > 0.5, s_a - s_n, s_n - s_a)
    return _balanced_mean(F.relu(margin - gap), labels)


def bce_loss(similarity: Tensor, labels: Tensor, num_normal: int, scale: float) -> Tensor:
    """Class-balanced binary cross-entropy on the concept softmax ``p_abn``."""
    p_abn = abnormal_probability(similarity, num_normal, scale).clamp(1e-6, 1.0 - 1e-6)
    return _balanced_mean(F.binary_cross_entropy(p_abn, labels, reduction="none"), labels)


@dataclass(frozen=True)
class TrainingSet:
    """Encoded training views with their labels."""

    features: Features  # V views: global [V, D], patches [V, L, N, D]
    patch_labels: Tensor  # [V, N] float 0/1
    image_labels: Tensor  # [V] float 0/1


def graph_settings(config: H2VLRConfig) -> GraphSettings:
    """Extract the hyperedge settings of ``config``."""
    return GraphSettings(
        k_neighbors=config.k_neighbors,
        spatial_size=config.spatial_size,
        semantic_members=config.semantic_members,
        semantic_edges=config.semantic_edges,
        pairwise=config.graph == "pairwise",
        temperature=config.edge_temperature,
    )


def alignment_loss(
    concepts: Tensor,
    reasoner: HypergraphReasoner | None,
    batch: TrainingSet,
    banks: Sequence[SupportBank],
    config: H2VLRConfig,
    num_normal: int,
) -> Tensor:
    """Patch-level plus weighted image-level loss of one batch of views.

    Args:
        concepts: ``[C, D]`` concepts from the prompt learner (with gradients).
        reasoner: the reasoner, or None without reasoning.
        batch: the views of this step.
        banks: one support bank per feature layer.
        config: method settings (loss kind, margin, weights).
        num_normal: number of normal concepts.
    """
    features = batch.features
    refined = refine(
        reasoner, features.patch_tokens, banks, concepts, features.grid_size, graph_settings(config)
    )
    patch_similarity = concept_similarity(refined.query, refined.concepts)  # [V, L, N, C]
    layer_labels = batch.patch_labels.unsqueeze(1).expand(-1, patch_similarity.shape[1], -1)
    image_similarity = concept_similarity(features.global_embeds, concepts)  # [V, C]

    if config.loss == "margin":
        patch = margin_loss(patch_similarity, layer_labels, num_normal, config.margin)
        image = margin_loss(image_similarity, batch.image_labels, num_normal, config.margin)
    else:
        patch = bce_loss(patch_similarity, layer_labels, num_normal, config.concept_scale)
        image = bce_loss(image_similarity, batch.image_labels, num_normal, config.concept_scale)
    loss = patch + config.image_loss_weight * image
    if config.map_loss_weight > 0:
        fused = layer_patch_scores(refined, num_normal, config.alpha, config.concept_scale)
        fused = fused.clamp(1e-6, 1.0 - 1e-6)
        map_term = F.binary_cross_entropy(fused, layer_labels, reduction="none")
        loss = loss + config.map_loss_weight * _balanced_mean(map_term, layer_labels)
    return loss


def train(
    parameters: Sequence[torch.nn.Parameter],
    step_loss: Callable[[Tensor], Tensor],
    num_views: int,
    config: H2VLRConfig,
    generator: torch.Generator,
) -> list[float]:
    """Run ``config.steps`` Adam steps; each draws ``views_per_step`` views with replacement.

    Args:
        parameters: trainable parameters; with none, no step runs.
        step_loss: maps view indices ``[views_per_step]`` to the scalar loss.
        num_views: number of training views to draw from.
        config: steps, learning rate and views per step.
        generator: the fit's seeded generator (CPU).

    Returns:
        The loss of every step, before its update.
    """
    parameters = list(parameters)
    if not parameters or config.steps == 0:
        return []
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    losses: list[float] = []
    for step in range(config.steps):
        views = torch.randint(num_views, (config.views_per_step,), generator=generator)
        loss = step_loss(views)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"H2VLR fit diverged: loss {loss.item()} at step {step}; "
                "lower learning_rate or check the input features for NaN"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    logger.debug("fit: %d steps, loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
    return losses
