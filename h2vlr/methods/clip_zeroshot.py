"""Zero-shot CLIP: the global image embedding against the normal and abnormal prompts.

Shapes: ``B`` images, ``D`` joint embedding width, ``S`` evaluation resolution.

The image score is the softmax probability of the abnormal class over the two scaled
cosine similarities, between the global embedding and the mean-pooled normal and
abnormal prompt ensembles (``encode_class_prompts``). The helpers here
(``abnormal_probability``, ``resolve_logit_scale``, ``config_from_options``) are shared
with the WinCLIP baselines.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F

from h2vlr.methods.base import AnomalyMethod, FitContext, QueryBatch, ScoreOutput
from h2vlr.methods.registry import register_method
from h2vlr.prompt_ensemble import encode_class_prompts

if TYPE_CHECKING:
    from h2vlr.backbone import ClipBackbone

logger = logging.getLogger(__name__)

# Inverse softmax temperature of CLIP models trained to convergence (open_clip clamps it there).
CLIP_LOGIT_SCALE = 100.0
NO_MAP_REASON = "method makes no anomaly map"

ConfigT = TypeVar("ConfigT")


@dataclasses.dataclass(frozen=True)
class ClipZeroShotConfig:
    """Options of ``clip-zeroshot``."""

    # Inverse temperature of the two-class softmax; None uses the model's exp(logit_scale).
    logit_scale: float | None = None


def config_from_options(config_cls: type[ConfigT], method: str, options: dict[str, Any]) -> ConfigT:
    """Build a frozen config dataclass from keyword options, rejecting unknown names.

    Raises:
        ValueError: an option name that ``config_cls`` does not define.
    """
    valid = [field.name for field in dataclasses.fields(config_cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        message = (
            f"unknown option(s) {', '.join(unknown)} for method {method!r}; "
            f"valid options: {', '.join(valid)}"
        )
        raise ValueError(message)
    return config_cls(**options)


def resolve_logit_scale(backbone: ClipBackbone, configured: float | None) -> float:
    """Return ``configured``, else the model's ``exp(logit_scale)``, else ``CLIP_LOGIT_SCALE``.

    Raises:
        ValueError: ``configured`` is not positive.
    """
    if configured is not None:
        if configured <= 0:
            raise ValueError(f"invalid logit_scale {configured}: expected a positive number")
        return float(configured)
    parameter = getattr(backbone.model, "logit_scale", None)
    if parameter is None:
        return CLIP_LOGIT_SCALE
    return float(torch.as_tensor(parameter).detach().float().exp().item())


def abnormal_probability(
    embeds: torch.Tensor, class_embeds: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Return the softmax probability of the abnormal class for each embedding.

    Args:
        embeds: ``[..., D]`` image, window or patch embeddings (any norm).
        class_embeds: ``[2, D]`` unit vectors, row 0 normal and row 1 abnormal.
        logit_scale: inverse temperature applied to the cosine similarities.

    Returns:
        ``[...]`` float32 probabilities in ``[0, 1]``.
    """
    cosine = F.normalize(embeds.float(), dim=-1) @ class_embeds.float().T  # [..., 2]
    return torch.softmax(logit_scale * cosine, dim=-1)[..., 1]


@register_method
class ClipZeroShot(AnomalyMethod):
    """Zero-shot CLIP classification; image scores only, no anomaly map."""

    name = "clip-zeroshot"
    variants = ("full",)
    makes_maps = False
    uses_support = False

    def __init__(self, variant: str = "full", **options: Any) -> None:
        super().__init__(variant, **options)
        self.config = config_from_options(ClipZeroShotConfig, self.name, options)
        self._class_embeds: torch.Tensor | None = None  # [2, D]
        self._logit_scale = CLIP_LOGIT_SCALE

    def fit(self, ctx: FitContext) -> dict[str, float]:
        """Encode the normal and abnormal prompt ensembles of the category."""
        self._class_embeds = encode_class_prompts(ctx.backbone, ctx.class_name).cpu()
        self._logit_scale = resolve_logit_scale(ctx.backbone, self.config.logit_scale)
        logger.info("clip-zeroshot: class %r, logit scale %.2f", ctx.class_name, self._logit_scale)
        return {"logit_scale": self._logit_scale}

    def score(self, batch: QueryBatch) -> ScoreOutput:
        """Score each image by the abnormal probability of its global embedding."""
        if self._class_embeds is None:
            raise RuntimeError("clip-zeroshot.score called before fit; call fit(ctx) first")
        probability = abnormal_probability(
            batch.features.global_embeds, self._class_embeds, self._logit_scale
        )
        return ScoreOutput(
            image_scores=probability.double().numpy(),
            anomaly_maps=None,
            map_reason=NO_MAP_REASON,
        )
