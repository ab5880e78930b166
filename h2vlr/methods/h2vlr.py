"""H2VLR: dynamic semantic induction, a heterogeneous hypergraph and hypergraph reasoning.

``fit`` canonicalises the support order, builds one support bank per feature layer,
encodes training views (augmented support images, half with synthetic anomalies) and
trains the prompt learner and the reasoner with the alignment loss for a fixed number
of seeded steps. ``score`` refines one hypergraph per (query image, feature layer) and
turns the refined nodes into anomaly maps and image scores (see ``h2vlr.scoring``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from h2vlr.augment import make_training_views
from h2vlr.config import VARIANTS, H2VLRConfig
from h2vlr.coreset import greedy_coreset
from h2vlr.data import load_image
from h2vlr.features import Features, image_sha256
from h2vlr.fitting import TrainingSet, alignment_loss, graph_settings, patch_labels, train
from h2vlr.hypergraph import SupportBank, grid_positions, make_support_bank
from h2vlr.methods.base import AnomalyMethod, FitContext, QueryBatch, ScoreOutput
from h2vlr.methods.registry import parse_variant, register_method
from h2vlr.prompts import PromptLearner, support_statistics
from h2vlr.reasoning import HypergraphReasoner, refine, support_context
from h2vlr.scoring import anomaly_maps_and_scores, global_probability, patch_scores

if TYPE_CHECKING:
    from h2vlr.backbone import ClipBackbone

logger = logging.getLogger(__name__)

DEFAULT_LOGIT_SCALE = 100.0  # CLIP's trained logit scale, for backbones that expose none


def resolve_concept_scale(config: H2VLRConfig, backbone: ClipBackbone) -> H2VLRConfig:
    """Replace ``concept_scale=0`` by the backbone's learned logit scale (about 100 for
    pretrained CLIP, 1 / 0.07 for a random initialisation)."""
    if config.concept_scale > 0:
        return config
    logit_scale = getattr(backbone.model, "logit_scale", None)
    scale = float(logit_scale.exp()) if logit_scale is not None else DEFAULT_LOGIT_SCALE
    logger.debug("concept scale from the backbone: %.2f", scale)
    return dataclasses.replace(config, concept_scale=scale)


def canonical_support_order(paths: Sequence[Path]) -> list[int]:
    """Order support images by file content hash, then path, so shuffles do not matter."""
    keys = [(image_sha256(Path(path)), str(path)) for path in paths]
    return sorted(range(len(paths)), key=keys.__getitem__)


def build_support_banks(
    support: Features, config: H2VLRConfig, seed: int, device: torch.device
) -> list[SupportBank]:
    """Build one support bank per feature layer, coreset-reduced beyond the configured size.

    The coreset runs once, on the layer mean of the unit patch tokens, so every layer
    keeps the same patches. The kept indices are sorted to stay in canonical order.
    """
    images, layers, patches, width = support.patch_tokens.shape
    tokens = F.normalize(support.patch_tokens.float(), dim=-1)
    tokens = tokens.permute(1, 0, 2, 3).reshape(layers, images * patches, width)
    positions = grid_positions(support.grid_size).repeat(images, 1)
    image_index = torch.arange(images).repeat_interleave(patches)

    keep = torch.arange(images * patches)
    if images * patches > config.max_support_patches:
        pooled = F.normalize(tokens.mean(dim=0), dim=-1)
        keep = greedy_coreset(pooled, config.max_support_patches, seed=seed).sort().values
        logger.info("coreset kept %d of %d support patches", keep.numel(), images * patches)

    banks = []
    for layer in range(layers):
        bank = make_support_bank(
            tokens[layer, keep],
            positions[keep],
            image_index[keep],
            config.spatial_size,
            config.edge_temperature,
        )
        banks.append(_bank_to(bank, device))
    return banks


def _bank_to(bank: SupportBank, device: torch.device) -> SupportBank:
    spatial = bank.spatial
    moved = type(spatial)(
        index=spatial.index.to(device),
        weight=spatial.weight.to(device),
        member_weight=spatial.member_weight.to(device),
        member_cosine=spatial.member_cosine.to(device),
        kind=spatial.kind.to(device),
        num_edges=spatial.num_edges,
    )
    return SupportBank(
        bank.features.to(device), bank.positions.to(device), bank.image_index.to(device), moved
    )


def make_training_set(
    ctx: FitContext, paths: Sequence[Path], config: H2VLRConfig, device: torch.device
) -> TrainingSet:
    """Make and encode the training views of the (canonically ordered) support images."""
    images = [load_image(path) for path in paths]
    views = make_training_views(
        images, ctx.backbone.image_size, config.n_views, ctx.seed, config.anomaly_fraction
    )
    features = ctx.extractor.encode_views([view.image for view in views])
    masks = torch.from_numpy(np.stack([view.mask for view in views]))
    return TrainingSet(
        features=Features(
            features.global_embeds.to(device), features.patch_tokens.to(device), features.grid_size
        ),
        patch_labels=patch_labels(masks, features.grid_size, config.patch_label_threshold).to(
            device
        ),
        image_labels=torch.tensor([float(view.label) for view in views], device=device),
    )


def _select(training: TrainingSet, views: Tensor) -> TrainingSet:
    rows = views.to(training.image_labels.device)
    features = training.features
    return TrainingSet(
        features=Features(
            features.global_embeds[rows], features.patch_tokens[rows], features.grid_size
        ),
        patch_labels=training.patch_labels[rows],
        image_labels=training.image_labels[rows],
    )


@dataclass
class _FittedState:
    reasoner: HypergraphReasoner | None
    banks: list[SupportBank]
    concepts: Tensor  # [C, D] unit concepts after the fit
    num_normal: int
    image_size: int  # S
    device: torch.device


@register_method
class H2VLRMethod(AnomalyMethod):
    """H2VLR with its ablation variants; options are the fields listed by ``option_names``."""

    name = "h2vlr"
    variants = VARIANTS
    makes_maps = True
    uses_support = True

    def __init__(self, variant: str = "full", **options: Any) -> None:
        super().__init__(variant, **options)
        base, _ = parse_variant(variant)
        self.config = H2VLRConfig.from_variant(base, options)
        self._state: _FittedState | None = None
        self.fit_losses: list[float] = []  # loss of every step of the last fit
        self.fitted_config = self.config  # config with concept_scale resolved by fit

    def fit(self, ctx: FitContext) -> dict[str, float]:
        """Train on the support set of ``ctx``; returns losses and sizes of the fit."""
        _check_support(ctx)
        config = resolve_concept_scale(self.config, ctx.backbone)
        self.fitted_config = config
        order = canonical_support_order(ctx.support_paths)
        support = ctx.support_features.index(order)
        paths = [Path(ctx.support_paths[i]) for i in order]
        # NOTE: only the CPU path has run; on CUDA, bit-identical reruns are not promised.
        device = ctx.device

        banks = build_support_banks(support, config, ctx.seed, device)
        stats = support_statistics(support).to(device)
        prompts, reasoner = self._build_modules(ctx, device)
        parameters = [p for p in prompts.parameters() if p.requires_grad]
        if reasoner is not None:
            parameters += list(reasoner.parameters())

        losses: list[float] = []
        views_encoded = 0
        set_loss = {"before": float("nan"), "after": float("nan")}
        if parameters and config.steps > 0:
            training = make_training_set(ctx, paths, config, device)
            views_encoded = len(training.image_labels)

            def step_loss(views: Tensor) -> Tensor:
                concepts = prompts(stats)
                batch = _select(training, views)
                return alignment_loss(concepts, reasoner, batch, banks, config, prompts.num_normal)

            set_loss["before"] = _loss_over_all_views(step_loss, views_encoded, config)
            generator = torch.Generator().manual_seed(ctx.seed)
            losses = train(parameters, step_loss, views_encoded, config, generator)
            set_loss["after"] = _loss_over_all_views(step_loss, views_encoded, config)

        self.fit_losses = losses
        with torch.no_grad():
            concepts = prompts(stats).detach()
        self._state = _FittedState(
            reasoner.eval() if reasoner is not None else None,
            banks,
            concepts,
            prompts.num_normal,
            ctx.backbone.image_size,
            device,
        )
        return {
            "loss_initial": losses[0] if losses else float("nan"),
            "loss_final": losses[-1] if losses else float("nan"),
            "train_loss_before": set_loss["before"],  # loss over all views before the steps
            "train_loss_after": set_loss["after"],  # and after them
            "fit_steps": float(len(losses)),
            "support_patches": float(banks[0].features.shape[0]),
            "views_encoded": float(views_encoded),
            "trainable_parameters": float(sum(p.numel() for p in parameters)),
        }

    def _build_modules(
        self, ctx: FitContext, device: torch.device
    ) -> tuple[PromptLearner, HypergraphReasoner | None]:
        """Create the trainable modules with parameters drawn from the job's seed."""
        config = self.fitted_config
        width = ctx.backbone.embed_dim
        # A forked RNG keeps the global generator untouched and the init reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            prompts = PromptLearner(
                ctx.backbone, ctx.class_name, config.dynamic_prompts, config.n_context
            ).to(device)
            reasoner = None
            if config.reasoning:
                # Message passing cost grows with the width; at D the projections start
                # as the identity.
                hidden = min(config.hidden_dim, width) if config.hidden_dim else width
                reasoner = HypergraphReasoner(
                    width, hidden, config.hsr_layers, config.attention
                ).to(device)
        return prompts, reasoner

    def score(self, batch: QueryBatch) -> ScoreOutput:
        """Score query images into image scores ``[B]`` and anomaly maps ``[B, S, S]``."""
        state = self._state
        if state is None:
            raise RuntimeError("H2VLR.score was called before fit; call fit(ctx) first")
        config = self.fitted_config
        features = batch.features
        size = state.image_size
        settings = graph_settings(config)
        maps, scores = [], []
        with torch.no_grad():
            # The support and concept side of the graphs is the same for every query.
            context = None
            if state.reasoner is not None:
                context = support_context(state.reasoner, state.banks, state.concepts, settings)
            for start in range(0, len(features.global_embeds), config.score_batch_size):
                stop = start + config.score_batch_size
                tokens = features.patch_tokens[start:stop].to(state.device)
                refined = refine(
                    state.reasoner,
                    tokens,
                    state.banks,
                    state.concepts,
                    features.grid_size,
                    settings,
                    context,
                )
                fused = patch_scores(refined, state.num_normal, config.alpha, config.concept_scale)
                global_p = global_probability(
                    features.global_embeds[start:stop].to(state.device),
                    state.concepts,
                    state.num_normal,
                    config.concept_scale,
                )
                batch_maps, batch_scores = anomaly_maps_and_scores(
                    fused.cpu(),
                    global_p.cpu(),
                    features.grid_size,
                    size,
                    config.sigma,
                    config.image_score_weight,
                )
                maps.append(batch_maps)
                scores.append(batch_scores)
        if not scores:
            return ScoreOutput(np.zeros(0), np.zeros((0, size, size), dtype=np.float32))
        return ScoreOutput(
            image_scores=torch.cat(scores).double().numpy(),
            anomaly_maps=torch.cat(maps).float().numpy(),
        )


@torch.no_grad()
def _loss_over_all_views(
    step_loss: Callable[[Tensor], Tensor], num_views: int, config: H2VLRConfig
) -> float:
    """Mean loss over fixed chunks of ``views_per_step`` views (bounded memory)."""
    chunks = torch.arange(num_views).split(config.views_per_step)
    return float(torch.stack([step_loss(chunk) for chunk in chunks]).mean())


def _check_support(ctx: FitContext) -> None:
    count = len(ctx.support_paths)
    if count == 0 or len(ctx.support_features.global_embeds) != count:
        raise ValueError(
            f"H2VLR needs at least one support image with features; got {count} paths and "
            f"{len(ctx.support_features.global_embeds)} feature rows"
        )
