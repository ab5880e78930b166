"""WinCLIP (zero-shot) and WinCLIP+ (few-shot) on the shared backbone and feature cache.

Shapes: ``B`` query images, ``k`` support images, ``N`` patches per image (``gh * gw``),
``W`` windows of one scale, ``D`` joint embedding width, ``S`` evaluation resolution,
``T`` tokens of one window sequence (class token plus ``s * s`` patches).

A window of scale ``s`` is an ``s x s`` block of patches on the patch grid, slid with
stride 1, so one scale has ``W = (gh - s + 1) * (gw - s + 1)`` windows. The visual
transformer runs on the class token and the window's patch tokens only, each with the
positional embedding of its place in the image. The window embedding is the pooled
output after the final LayerNorm and projection, as in WinCLIP (Jeong et al., CVPR
2023). Window embeddings depend only on the image and the backbone, so they are cached
per image through ``FeatureExtractor.extract_extra``.

Zero-shot scale maps: each window's abnormal probability against the prompt ensemble,
spread to the patches it covers by harmonic averaging. The patch tokens of one feature
layer give the smallest scale directly. The zero-shot map is the mean of the scale maps
and the image score is the abnormal probability of the global embedding.

Few-shot (WinCLIP+) scale maps: each query token's minimum over all support tokens of
the same scale of ``(1 - cosine) / 2``, spread the same way. The pixel map is the mean
of the zero-shot and few-shot maps, and the image score the mean of the zero-shot image
score and the maximum of the few-shot patch map.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from h2vlr.maps import patch_scores_to_maps
from h2vlr.methods.base import AnomalyMethod, FitContext, QueryBatch, ScoreOutput
from h2vlr.methods.clip_zeroshot import (
    abnormal_probability,
    config_from_options,
    resolve_logit_scale,
)
from h2vlr.methods.patch_knn import nearest_cosine_distance, support_order
from h2vlr.methods.registry import register_method
from h2vlr.prompt_ensemble import encode_class_prompts

if TYPE_CHECKING:
    from h2vlr.backbone import ClipBackbone
    from h2vlr.features import FeatureExtractor, Features

logger = logging.getLogger(__name__)

WINDOW_KIND_PREFIX = "winclip-windows"
PATCH_SCALE = 0  # key of the patch tokens among the window scales (which are >= 1)
# Harmonic averaging divides by window scores, so a score of 0 is clamped to this value.
_HARMONIC_EPS = 1e-8


# ----------------------------------------------------------------------------- options


def parse_scales(value: int | str | Sequence[int]) -> tuple[int, ...]:
    """Parse window scales from an option value: ``3``, ``"2,3"``, ``(2, 3)`` or ``""``.

    Returns:
        Sorted, unique scales; empty for ``""`` or ``"none"``.

    Raises:
        ValueError: a scale that is not an integer >= 1.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        parts = [] if text in ("", "none") else text.split(",")
        try:
            scales = [int(part) for part in parts]
        except ValueError:
            raise ValueError(
                f"invalid window scales {value!r}: expected integers separated by commas, "
                "for example scales=2,3"
            ) from None
    elif isinstance(value, int):
        scales = [value]
    else:
        scales = [int(scale) for scale in value]
    if any(scale < 1 for scale in scales):
        raise ValueError(f"invalid window scales {value!r}: every scale must be >= 1 patches")
    return tuple(sorted(set(scales)))


@dataclasses.dataclass(frozen=True)
class WinClipConfig:
    """Options of ``winclip`` and ``winclip-plus``."""

    scales: tuple[int, ...] = (2, 3)  # window sizes in patches ("2,3" in a variant string)
    patch_scale: bool = True  # add the patch tokens as the smallest scale
    patch_layer: int = -1  # index into the backbone's feature layers of those patch tokens
    logit_scale: float | None = None  # softmax inverse temperature; None: the model's
    sigma: float = 4.0  # Gaussian smoothing of the map, in pixels at resolution S
    window_batch: int = 4096  # window sequences per transformer forward (memory bound)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", parse_scales(self.scales))
        if not self.scales and not self.patch_scale:
            raise ValueError(
                "winclip needs at least one scale: set scales (e.g. scales=2,3) or patch_scale=true"
            )
        if self.sigma < 0:
            raise ValueError(f"invalid sigma {self.sigma}: expected >= 0 pixels")
        if self.window_batch < 1:
            raise ValueError(f"invalid window_batch {self.window_batch}: expected >= 1")


def window_kind(scales: Sequence[int]) -> str:
    """Name the cached window computation and its scales, e.g. ``winclip-windows:2,3``."""
    return f"{WINDOW_KIND_PREFIX}:{','.join(str(scale) for scale in scales)}"


def window_key(scale: int) -> str:
    """Name of the ``[B, W, D]`` tensor of one scale in ``encode_windows`` output."""
    return f"window_{scale}"


# ----------------------------------------------------------------------------- windows


def window_patch_indices(grid_size: tuple[int, int], scale: int) -> torch.Tensor:
    """Return the row-major patch indices ``[W, scale * scale]`` of every stride-1 window.

    Windows are ordered row-major by their top-left patch.

    Raises:
        ValueError: ``scale`` does not fit in the grid.
    """
    gh, gw = grid_size
    if not 1 <= scale <= min(gh, gw):
        raise ValueError(
            f"invalid window scale {scale} for a {gh}x{gw} patch grid: expected 1..{min(gh, gw)}"
        )
    rows = torch.arange(gh - scale + 1)
    cols = torch.arange(gw - scale + 1)
    top_left = (rows[:, None] * gw + cols[None, :]).reshape(-1)  # [W]
    offsets = (torch.arange(scale)[:, None] * gw + torch.arange(scale)[None, :]).reshape(-1)
    return top_left[:, None] + offsets[None, :]


def window_coverage(grid_size: tuple[int, int], scale: int) -> torch.Tensor:
    """Return the ``[W, N]`` 0/1 matrix of which patches each window covers."""
    indices = window_patch_indices(grid_size, scale)
    coverage = torch.zeros(indices.shape[0], grid_size[0] * grid_size[1])
    return coverage.scatter_(1, indices, 1.0)


def harmonic_spread(window_scores: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Spread window scores to patches by the harmonic mean over the covering windows.

    A patch covered by windows with scores ``s_1 .. s_n`` gets ``n / sum(1 / s_i)``, so
    one window with a score near 0 pulls the patch near 0.

    Args:
        window_scores: ``[B, W]`` non-negative scores.
        coverage: ``[W, N]`` from ``window_coverage``.

    Returns:
        ``[B, N]`` patch scores.
    """
    coverage = coverage.to(window_scores)
    inverse = 1.0 / window_scores.clamp_min(_HARMONIC_EPS)  # [B, W]
    return coverage.sum(dim=0) / (inverse @ coverage)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # Same precision policy as the backbone's own encoders: bf16 (else fp16) on CUDA.
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _check_visual_tower(visual: torch.nn.Module) -> None:
    pool_type = getattr(visual, "pool_type", None)
    supported = (
        getattr(visual, "attn_pool", None) is None
        and getattr(visual, "proj", None) is not None
        and pool_type in ("tok", "avg")
    )
    if not supported:
        raise ValueError(
            f"window embeddings need an open_clip ViT image tower with class-token or "
            f"average pooling and a projection; got {type(visual).__name__} with "
            f"pool_type={pool_type!r}. Use a CLIP ViT such as ViT-B-16-plus-240"
        )


def _token_embeddings(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Return the transformer input ``[B, 1 + N, width]``: class and patch tokens with positions."""
    patches = visual.conv1(pixels)  # [B, width, gh, gw]
    patches = patches.flatten(2).transpose(1, 2)  # [B, N, width]
    class_token = visual.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
    tokens = torch.cat([class_token, patches], dim=1)
    tokens = tokens + visual.positional_embedding.to(patches.dtype)
    # ln_pre is applied per token, so normalising before choosing a window's tokens is exact.
    return visual.ln_pre(tokens)


def _encode_sequences(visual: torch.nn.Module, sequences: torch.Tensor) -> torch.Tensor:
    """Run ``[n, T, width]`` token sequences through the transformer; return pooled ``[n, D]``."""
    hidden = visual.transformer(sequences)
    if visual.final_ln_after_pool:
        pooled = hidden[:, 0] if visual.pool_type == "tok" else hidden[:, 1:].mean(dim=1)
        pooled = visual.ln_post(pooled)
    else:
        hidden = visual.ln_post(hidden)
        pooled = hidden[:, 0] if visual.pool_type == "tok" else hidden[:, 1:].mean(dim=1)
    return pooled @ visual.proj


@torch.no_grad()
def encode_windows(
    backbone: ClipBackbone,
    pixels: torch.Tensor,
    scales: Sequence[int],
    window_batch: int = 4096,
) -> dict[str, torch.Tensor]:
    """Encode every stride-1 window of each scale with the backbone's visual transformer.

    Each window runs as its own sequence: the class token and the window's ``s * s``
    patch tokens, with the positional embeddings of their places in the full image.
    Sequences of all images and windows of a scale are batched, ``window_batch`` at a
    time. A window covering the whole grid reproduces the global image embedding.

    Args:
        backbone: the frozen backbone (an open_clip ViT image tower).
        pixels: ``[B, 3, S, S]`` preprocessed images.
        scales: window sizes in patches.
        window_batch: sequences per transformer forward.

    Returns:
        ``window_key(s)`` mapped to unnormalised float32 embeddings ``[B, W_s, D]`` on
        the backbone's device, windows in ``window_patch_indices`` order.
    """
    visual = backbone.model.visual
    _check_visual_tower(visual)
    device = backbone.device
    outputs: dict[str, torch.Tensor] = {}
    with _autocast(device):
        tokens = _token_embeddings(visual, pixels.to(device))  # [B, 1 + N, width]
        batch, _, width = tokens.shape
        for scale in scales:
            patch_indices = window_patch_indices(backbone.grid_size, scale).to(device)
            class_index = torch.zeros(patch_indices.shape[0], 1, dtype=torch.long, device=device)
            positions = torch.cat([class_index, patch_indices + 1], dim=1)  # [W, T]
            sequences = tokens[:, positions].reshape(
                -1, positions.shape[1], width
            )  # [B*W, T, width]
            pooled = [
                _encode_sequences(visual, chunk)
                for chunk in torch.split(sequences, window_batch, dim=0)
            ]
            embeds = torch.cat(pooled).float()
            outputs[window_key(scale)] = embeds.reshape(batch, positions.shape[0], -1)
    return outputs


# ----------------------------------------------------------------------------- methods


@register_method
class WinClip(AnomalyMethod):
    """Zero-shot WinCLIP: prompt-ensemble scores of windows, patches and the whole image."""

    name = "winclip"
    variants = ("full",)
    makes_maps = True
    uses_support = False

    def __init__(self, variant: str = "full", **options: Any) -> None:
        super().__init__(variant, **options)
        self.config = config_from_options(WinClipConfig, self.name, options)
        self._backbone: ClipBackbone | None = None
        self._extractor: FeatureExtractor | None = None
        self._class_embeds: torch.Tensor | None = None  # [2, D] unit rows: normal, abnormal
        self._logit_scale = 0.0
        self._coverage: dict[int, torch.Tensor] = {}  # scale -> [W, N]

    # -- fitting

    def fit(self, ctx: FitContext) -> dict[str, float]:
        """Encode the prompt ensemble and prepare the window layout of the patch grid."""
        self._backbone = ctx.backbone
        self._extractor = ctx.extractor
        self._class_embeds = encode_class_prompts(ctx.backbone, ctx.class_name).to(ctx.device)
        self._logit_scale = resolve_logit_scale(ctx.backbone, self.config.logit_scale)
        self._check_patch_layer(len(ctx.backbone.identity.layers))
        self._coverage = {
            scale: window_coverage(ctx.backbone.grid_size, scale).to(ctx.device)
            for scale in self.config.scales
        }
        logger.info(
            "%s: class %r, window scales %s, patch scale %s, logit scale %.2f",
            self.name,
            ctx.class_name,
            self.config.scales,
            self.config.patch_scale,
            self._logit_scale,
        )
        return {"logit_scale": self._logit_scale}

    def _check_patch_layer(self, num_layers: int) -> None:
        layer = self.config.patch_layer
        if self.config.patch_scale and not -num_layers <= layer < num_layers:
            raise ValueError(
                f"invalid patch_layer {layer} for a backbone with {num_layers} feature layers; "
                f"expected an index in {-num_layers}..{num_layers - 1}"
            )

    def _require_fit(self) -> ClipBackbone:
        if self._backbone is None:
            raise RuntimeError(f"{self.name}.score called before fit; call fit(ctx) first")
        return self._backbone

    # -- features

    def cache_extras(
        self, backbone: ClipBackbone, extractor: FeatureExtractor, paths: list[Path]
    ) -> None:
        """Compute and cache the window embeddings of image files; needs no fit."""
        self._cached_windows(backbone, extractor, paths)

    def window_embeddings(self, paths: Sequence[Path]) -> dict[int, torch.Tensor]:
        """Return the cached window embeddings ``[B, W_s, D]`` of image files, per scale."""
        return self._cached_windows(self._require_fit(), self._extractor, paths)

    def _cached_windows(
        self, backbone: ClipBackbone, extractor: FeatureExtractor, paths: Sequence[Path]
    ) -> dict[int, torch.Tensor]:
        scales = self.config.scales
        if not scales:
            return {}

        def compute(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
            return encode_windows(backbone, pixels, scales, self.config.window_batch)

        values = extractor.extract_extra(list(paths), window_kind(scales), compute)
        return {scale: values[window_key(scale)] for scale in scales}

    def scale_tokens(self, features: Features, paths: Sequence[Path]) -> dict[int, torch.Tensor]:
        """Return the tokens ``[B, W_s, D]`` of every scale, with the patch tokens under ``PATCH_SCALE``."""
        device = self._class_embeds.device
        tokens = {scale: t.to(device) for scale, t in self.window_embeddings(paths).items()}
        if self.config.patch_scale:
            tokens[PATCH_SCALE] = features.patch_tokens[:, self.config.patch_layer].to(device)
        return tokens

    def spread(self, scale: int, scores: torch.Tensor) -> torch.Tensor:
        """Map ``[B, W_s]`` scores of one scale to ``[B, N]`` patch scores."""
        if scale == PATCH_SCALE:
            return scores
        return harmonic_spread(scores, self._coverage[scale])

    # -- scoring

    def zero_shot_patch_scores(self, tokens: dict[int, torch.Tensor]) -> torch.Tensor:
        """Return the mean over scales of the spread abnormal probabilities, ``[B, N]``."""
        maps = [
            self.spread(scale, abnormal_probability(t, self._class_embeds, self._logit_scale))
            for scale, t in sorted(tokens.items())
        ]
        return torch.stack(maps).mean(dim=0)

    def zero_shot_image_scores(self, features: Features) -> torch.Tensor:
        """Return the abnormal probability ``[B]`` of the global embeddings."""
        global_embeds = features.global_embeds.to(self._class_embeds.device)
        return abnormal_probability(global_embeds, self._class_embeds, self._logit_scale)

    def to_output(self, image_scores: torch.Tensor, patch_scores: torch.Tensor) -> ScoreOutput:
        """Upsample ``[B, N]`` patch scores to maps and package them with ``[B]`` image scores."""
        backbone = self._require_fit()
        maps = patch_scores_to_maps(
            patch_scores, backbone.grid_size, backbone.image_size, sigma=self.config.sigma
        )
        return ScoreOutput(
            image_scores=image_scores.double().cpu().numpy(),
            anomaly_maps=maps.cpu().numpy().astype("float32"),
        )

    def score(self, batch: QueryBatch) -> ScoreOutput:
        """Score query images with the zero-shot window, patch and image scores."""
        self._require_fit()
        tokens = self.scale_tokens(batch.features, batch.paths)
        return self.to_output(
            self.zero_shot_image_scores(batch.features), self.zero_shot_patch_scores(tokens)
        )


def reference_association(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Return the minimum over references of ``(1 - cosine) / 2`` for each query token.

    Args:
        queries: ``[B, W, D]`` query tokens of one scale.
        references: ``[R, D]`` support tokens of the same scale.

    Returns:
        ``[B, W]`` scores in ``[0, 1]``.
    """
    batch, windows, dim = queries.shape
    distance = nearest_cosine_distance(queries.reshape(-1, dim), references)
    return (distance / 2.0).reshape(batch, windows)


@register_method
class WinClipPlus(WinClip):
    """Few-shot WinCLIP+: zero-shot WinCLIP fused with reference association to the support set."""

    name = "winclip-plus"
    variants = ("full",)
    makes_maps = True
    uses_support = True

    def __init__(self, variant: str = "full", **options: Any) -> None:
        super().__init__(variant, **options)
        self._references: dict[int, torch.Tensor] = {}  # scale -> [k * W_s, D]

    def fit(self, ctx: FitContext) -> dict[str, float]:
        """Encode the prompts and collect the support tokens of every scale."""
        stats = super().fit(ctx)
        if len(ctx.support_paths) == 0:
            raise ValueError(
                "winclip-plus needs at least one support image; got an empty support set "
                "(use winclip for zero-shot scoring)"
            )
        # Sorting by path makes the references independent of the sampler's order.
        order = support_order(ctx.support_paths)
        paths = [ctx.support_paths[i] for i in order]
        tokens = self.scale_tokens(ctx.support_features.index(order), paths)
        self._references = {scale: t.reshape(-1, t.shape[-1]) for scale, t in tokens.items()}
        stats["reference_tokens"] = float(sum(t.shape[0] for t in self._references.values()))
        return stats

    def few_shot_patch_scores(self, tokens: dict[int, torch.Tensor]) -> torch.Tensor:
        """Return the mean over scales of the spread reference association, ``[B, N]``."""
        maps = [
            self.spread(scale, reference_association(t, self._references[scale]))
            for scale, t in sorted(tokens.items())
        ]
        return torch.stack(maps).mean(dim=0)

    def score(self, batch: QueryBatch) -> ScoreOutput:
        """Fuse the zero-shot and few-shot maps and scores by equal-weight means."""
        self._require_fit()
        tokens = self.scale_tokens(batch.features, batch.paths)
        zero_shot = self.zero_shot_patch_scores(tokens)  # [B, N]
        few_shot = self.few_shot_patch_scores(tokens)  # [B, N]
        image_scores = (self.zero_shot_image_scores(batch.features) + few_shot.amax(dim=1)) / 2
        return self.to_output(image_scores, (zero_shot + few_shot) / 2)
