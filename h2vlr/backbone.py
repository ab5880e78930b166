"""Frozen open_clip backbone: weights resolution, preprocessing, image and text encoding.

Shapes: ``B`` images, ``L`` feature layers, ``N`` patches per image (``gh * gw``),
``D`` joint image-text embedding width, ``S`` evaluation resolution, ``T`` prompts,
``C`` text context length, ``W`` text transformer width.

Default backbone: ``ViT-B-16-plus-240`` with the ``laion400m_e32`` tag. ViT-B-16+ at 240
pixels trained on LAION-400M is the backbone that WinCLIP, PromptAD and InCTRL report
their few-shot results with, so the baselines run on the features their authors used.
open_clip lists two LAION-400M checkpoints for it: ``laion400m_e32`` is the final one,
and the PromptAD and InCTRL setups name it. anomalib's WinCLIP loads ``laion400m_e31``,
one epoch earlier, which ``--pretrained laion400m_e31`` selects.

Patch tokens come from open_clip's ``forward_intermediates``: the token sequence after
each selected transformer block, without the class token, mapped through the visual
tower's final LayerNorm (``ln_post``) and projection (``proj``) into the joint space,
which is how WinCLIP-style methods compare patches with text embeddings.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.transformer import VisionTransformer, text_global_pool
from PIL import Image

from h2vlr.data.loading import resize_mask
from h2vlr.paths import file_sha256

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-16-plus-240"
DEFAULT_PRETRAINED = "laion400m_e32"
TINY_TEST = "tiny-test"
NO_WEIGHTS = "none"
DEFAULT_NUM_LAYERS = 4
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

# Changes whenever preprocess_image or preprocess_mask changes what they return, so that
# cached features computed with the old preprocessing are never reused.
PREPROCESS_VERSION = "resize-bicubic-square-v1"

_HUB_WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class WeightsNotAvailableError(RuntimeError):
    """Pretrained weights are neither in a local cache nor downloadable."""


@dataclass(frozen=True)
class BackboneIdentity:
    """Everything that determines the features a backbone computes for an image."""

    model_name: str  # open_clip name, or "tiny-test"
    weights: str  # pretrained tag, "file:<abs path>@sha256:<hex>", or "none"
    image_size: int  # S, the square input resolution
    layers: tuple[int, ...]  # 1-based transformer block indices of the patch tokens
    preprocess_version: str  # PREPROCESS_VERSION at extraction time


def register_model_configs() -> None:
    """Register the JSON configs in ``h2vlr/model_configs`` (``tiny-test``) with open_clip."""
    shipped = {path.stem for path in MODEL_CONFIG_DIR.glob("*.json")}
    if not shipped.issubset(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def default_layers(num_blocks: int, count: int = DEFAULT_NUM_LAYERS) -> tuple[int, ...]:
    """Return ``count`` evenly spaced 1-based block indices ending at the last block.

    Block ``i * num_blocks // count`` for ``i = 1 .. count``: 12 blocks give (3, 6, 9, 12),
    24 blocks give (6, 12, 18, 24), 4 blocks give (1, 2, 3, 4). A model with fewer than
    ``count`` blocks uses all of them.
    """
    if num_blocks < count:
        return tuple(range(1, num_blocks + 1))
    return tuple(i * num_blocks // count for i in range(1, count + 1))


# ----------------------------------------------------------------------------- weights


def _check_model_name(name: str) -> None:
    register_model_configs()
    known = open_clip.list_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    message = (
        f"unknown backbone {name!r}: expected an open_clip model name "
        f"(open_clip.list_models()) or {TINY_TEST!r}{hint}"
    )
    raise ValueError(message)


def checkpoint_identity(path: Path) -> str:
    """Return ``file:<abs path>@sha256:<hex>`` for a local checkpoint file."""
    resolved = path.expanduser().resolve()
    return f"file:{resolved}@sha256:{file_sha256(resolved)}"


def _offline() -> bool:
    return any(
        os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"} for name in _OFFLINE_ENV
    )


def _hub_names_other_tag(hub_repo: str, tag: str) -> bool:
    # open_clip 3.3 points the Hub source of ViT-B-16-plus-240 laion400m_e32 at the
    # ".laion400m_e31" repository. A repository named for another tag contains other weights.
    repo_name = hub_repo.rstrip("/").rsplit("/", 1)[-1]
    return "." in repo_name and repo_name.rsplit(".", 1)[-1] != tag


def _cached_tag_checkpoint(cfg: dict, tag: str) -> Path | None:
    """Return the cached checkpoint file of a pretrained config, looking only on disk.

    The Hugging Face cache comes first, as in open_clip, unless the Hub repository is
    named for another tag. Then comes ``~/.cache/clip``, where open_clip stores files it
    downloads from the config's URL.
    """
    url = cfg.get("url", "")
    hub = cfg.get("hf_hub", "")
    if hub and not (url and _hub_names_other_tag(hub, tag)):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)  # "org/repo/" names the repository's default file
        for name in (filename,) if filename else _HUB_WEIGHTS_FILES:
            found = try_to_load_from_cache(repo_id=repo_id, filename=name)
            if isinstance(found, str):
                return Path(found)

    if url:
        candidate = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def _unavailable(name: str, tag: str, reason: str) -> WeightsNotAvailableError:
    message = (
        f"weights for backbone {name!r} with pretrained tag {tag!r} are not available: "
        f"{reason}. Fixes: pass a local checkpoint file with --pretrained /path/to/weights.bin, "
        f"or download the weights on a machine with network access "
        f"(open_clip.create_model({name!r}, pretrained={tag!r})) and copy the Hugging Face "
        f"cache (~/.cache/huggingface) or ~/.cache/clip to this machine."
    )
    return WeightsNotAvailableError(message)


def _tag_checkpoint(name: str, tag: str) -> Path:
    """Return the checkpoint file of a pretrained tag from the cache, downloading if allowed."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    cached = _cached_tag_checkpoint(cfg, tag)
    if cached is not None:
        return cached
    if _offline():
        raise _unavailable(name, tag, "not in the local cache and HF_HUB_OFFLINE is set")

    prefer_hub = not (cfg.get("url") and _hub_names_other_tag(cfg.get("hf_hub", ""), tag))
    logger.info("Downloading weights for %s (%s)", name, tag)
    try:
        target = open_clip.download_pretrained(cfg, prefer_hf_hub=prefer_hub)
    except Exception as exc:  # network, HTTP and Hub errors all mean the same to the caller
        raise _unavailable(name, tag, f"download failed ({exc})") from exc
    if not target:
        raise _unavailable(name, tag, "open_clip has no download source for this tag")
    return Path(target)


def _resolve(name: str, pretrained: str) -> tuple[str, Path | None, dict]:
    """Return the weights identity, the checkpoint file (None for random init) and tag config."""
    _check_model_name(name)
    if pretrained == NO_WEIGHTS:
        return NO_WEIGHTS, None, {}

    candidate = Path(pretrained).expanduser()
    if candidate.is_file():
        return checkpoint_identity(candidate), candidate.resolve(), {}

    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        message = (
            f"invalid pretrained value {pretrained!r} for backbone {name!r}: it is neither an "
            f"existing checkpoint file nor a known tag (tags: {', '.join(tags) or 'none'}); "
            f"pass a tag, a checkpoint path, or {NO_WEIGHTS!r} for random weights"
        )
        raise ValueError(message)
    return (
        pretrained,
        _tag_checkpoint(name, pretrained),
        open_clip.get_pretrained_cfg(name, pretrained),
    )


def resolve_weights(name: str, pretrained: str) -> str:
    """Check that the weights can be loaded and return their identity.

    Call this before starting jobs: it only reads the local caches, or downloads the
    checkpoint when the network allows, and never builds the model.

    NOTE: with no network and ``HF_HUB_OFFLINE`` unset, the Hugging Face client retries
    for about 45 seconds (measured with huggingface_hub 2.4) before this raises. Set
    ``HF_HUB_OFFLINE=1`` on offline machines to fail at once.

    Args:
        name: open_clip model name or ``tiny-test``.
        pretrained: a pretrained tag, a local checkpoint path, or ``none``.

    Returns:
        The tag, ``file:<abs path>@sha256:<hex>`` for a checkpoint file, or ``none``.

    Raises:
        ValueError: unknown model name, or ``pretrained`` is neither a tag nor a file.
        WeightsNotAvailableError: the tag's weights are not cached and cannot be downloaded.
    """
    identity, _, _ = _resolve(name, pretrained)
    return identity


# ----------------------------------------------------------------------------- model


def resolve_device(device: str) -> torch.device:
    """Map ``auto|cpu|cuda`` to a torch device; ``auto`` picks CUDA when available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "device 'cuda' requested but CUDA is not available; use 'cpu' or 'auto'"
            )
        return torch.device("cuda")
    raise ValueError(f"invalid device {device!r}; expected one of: auto, cpu, cuda")


def _check_architecture(name: str, model: torch.nn.Module) -> None:
    visual = getattr(model, "visual", None)
    supported = (
        isinstance(model, open_clip.CLIP)
        and isinstance(visual, VisionTransformer)
        and visual.attn_pool is None
        and visual.proj is not None
    )
    if not supported:
        message = (
            f"backbone {name!r} is not supported: patch tokens need a CLIP model with a ViT "
            f"image tower without attentional pooling (for example ViT-B-16-plus-240 or "
            f"ViT-L-14-336)"
        )
        raise ValueError(message)


def _check_layers(layers: tuple[int, ...], num_blocks: int, name: str) -> None:
    if not layers or any(layer < 1 or layer > num_blocks for layer in layers):
        message = (
            f"invalid layers {layers} for backbone {name!r}: expected 1-based block indices "
            f"between 1 and {num_blocks}"
        )
        raise ValueError(message)
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"invalid layers {layers}: expected strictly increasing block indices")


class ClipBackbone:
    """A frozen open_clip model with the preprocessing and encoders the methods use.

    Every parameter has ``requires_grad=False`` and the model stays in eval mode.
    Embeddings are returned unnormalised in float32.
    """

    def __init__(
        self,
        model: open_clip.CLIP,
        tokenizer: Callable[[list[str]], torch.Tensor],
        identity: BackboneIdentity,
        device: torch.device,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        self.image_size = identity.image_size
        self.layers = identity.layers
        self.grid_size: tuple[int, int] = tuple(model.visual.grid_size)
        self.embed_dim: int = model.visual.output_dim
        self.text_width: int = model.transformer.width
        self.context_length: int = model.context_length
        self.num_blocks: int = model.visual.transformer.layers
        self._mean = torch.tensor(mean).view(3, 1, 1)
        self._std = torch.tensor(std).view(3, 1, 1)

    # -- preprocessing

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """Resize the whole image to ``S x S`` (bicubic) and normalise it.

        Returns:
            Pixels ``[3, S, S]`` float32, normalised with the model's mean and std.
        """
        size = (self.image_size, self.image_size)
        resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
        return (pixels.permute(2, 0, 1) - self._mean) / self._std

    def preprocess_mask(self, mask: np.ndarray) -> np.ndarray:
        """Resize a mask ``[H, W]`` to ``S x S`` with nearest-neighbour interpolation.

        Returns:
            Bool ``[S, S]``, aligned with ``preprocess_image`` of the same image.
        """
        if mask.ndim != 2:
            raise ValueError(f"invalid mask shape {mask.shape}: expected [H, W]")
        return resize_mask(np.asarray(mask, dtype=bool), self.image_size)

    # -- encoders

    def _autocast(self) -> contextlib.AbstractContextManager:
        # NOTE: the CUDA branch has not run on a GPU yet; the tests cover the CPU path only.
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode preprocessed images.

        Args:
            pixels: ``[B, 3, S, S]`` from ``preprocess_image``.

        Returns:
            Global embeddings ``[B, D]`` and patch tokens ``[B, L, N, D]``, float32 on
            ``self.device``.
        """
        visual = self.model.visual
        with torch.no_grad(), self._autocast():
            output = self.model.forward_intermediates(
                image=pixels.to(self.device),
                image_indices=[layer - 1 for layer in self.layers],
                normalize=False,
                image_output_fmt="NLC",
            )
            tokens = torch.stack(output["image_intermediates"], dim=1)  # [B, L, N, width]
            patch_tokens = visual.ln_post(tokens) @ visual.proj  # [B, L, N, D]
        return output["image_features"].float(), patch_tokens.float()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Tokenize prompts into ids ``[T, C]`` with the model's tokenizer."""
        return self.tokenizer(texts)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Encode token ids ``[T, C]`` into text embeddings ``[T, D]`` without gradients."""
        with torch.no_grad(), self._autocast():
            return self.model.encode_text(token_ids.to(self.device)).float()

    def token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Look up the input embeddings ``[T, C, W]`` (float32, detached) of token ids."""
        with torch.no_grad():
            return self.model.token_embedding(token_ids.to(self.device)).float()

    def encode_text_embeddings(
        self, embeddings: torch.Tensor, token_ids: torch.Tensor
    ) -> torch.Tensor:
        """Encode input embeddings through the frozen text tower, keeping their gradients.

        A prompt learner replaces some rows of ``token_embeddings(token_ids)`` with
        learnable context vectors; gradients reach ``embeddings`` only.

        Args:
            embeddings: ``[T, C, W]`` input embeddings.
            token_ids: ``[T, C]`` ids whose end-of-text positions select the pooled token.

        Returns:
            Text embeddings ``[T, D]`` float32.
        """
        model = self.model
        token_ids = token_ids.to(self.device)
        with self._autocast():
            cast_dtype = model.transformer.get_cast_dtype()
            x = embeddings.to(self.device, cast_dtype) + model.positional_embedding.to(cast_dtype)
            x = model.transformer(x, attn_mask=model.attn_mask)
            x = model.ln_final(x)  # [T, C, W]
            pooled = text_global_pool(x, token_ids, model.text_pool_type, model.text_eos_id)
            projected = pooled @ model.text_projection  # [T, D]
        return projected.float()


def _model_mean_std(tag_cfg: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = tuple(tag_cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(tag_cfg.get("std") or open_clip.OPENAI_DATASET_STD)
    return mean, std


RANDOM_INIT_SEED = 0  # seed of the "--pretrained none" weights


def _build_model(
    name: str, checkpoint: Path | None, tag_cfg: dict, image_size: int | None
) -> open_clip.CLIP:
    # A pretrained config records whether its weights use QuickGELU, as the OpenAI ones do.
    # open_clip only warns when the model config disagrees, so the activation is forced here.
    # Random init draws from a fixed seed, without touching the caller's generator: every
    # process (feature tasks, jobs, reruns) must build the same "none" model, because the
    # feature cache and the results identify it by the weights string "none" alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return open_clip.create_model(
            name,
            pretrained=str(checkpoint) if checkpoint is not None else None,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            force_image_size=image_size,
            device="cpu",
        )


def _check_image_size(name: str, image_size: int, patch_size: tuple[int, int]) -> None:
    if image_size <= 0 or image_size % patch_size[0] != 0:
        message = (
            f"invalid image_size {image_size} for backbone {name!r}: expected a positive "
            f"multiple of the patch size {patch_size[0]}"
        )
        raise ValueError(message)


def load_backbone(
    name: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    device: str = "auto",
    image_size: int | None = None,
    layers: tuple[int, ...] | list[int] | None = None,
) -> ClipBackbone:
    """Build a frozen backbone.

    Args:
        name: open_clip model name, or ``tiny-test`` (a small random-init config for tests).
        pretrained: a pretrained tag, a local checkpoint path, or ``none`` (random weights).
            A checkpoint file of weights trained with QuickGELU (the OpenAI ones) needs the
            ``-quickgelu`` model name, for example ``ViT-L-14-336-quickgelu``.
        device: ``auto``, ``cpu`` or ``cuda``; CUDA runs under bf16 autocast (fp16 where
            bf16 is unsupported).
        image_size: evaluation resolution ``S``; default the model's own input size.
            Learned position embeddings are interpolated when it differs.
        layers: 1-based block indices of the patch tokens; default ``default_layers``.

    Raises:
        ValueError: invalid name, pretrained value, device, image size or layers.
        WeightsNotAvailableError: the tag's weights are neither cached nor downloadable.
    """
    weights, checkpoint, tag_cfg = _resolve(name, pretrained)
    if checkpoint is None:
        logger.warning(
            "Backbone %s uses random weights (--pretrained none): scores are not meaningful", name
        )
    else:
        logger.info("Loading backbone %s weights %s from %s", name, weights, checkpoint)
    if image_size is not None:
        patch = open_clip.get_model_config(name)["vision_cfg"]["patch_size"]
        _check_image_size(name, image_size, (patch, patch) if isinstance(patch, int) else patch)

    model = _build_model(name, checkpoint, tag_cfg, image_size)
    _check_architecture(name, model)
    num_blocks = model.visual.transformer.layers
    chosen = tuple(layers) if layers is not None else default_layers(num_blocks)
    _check_layers(chosen, num_blocks, name)

    torch_device = resolve_device(device)
    mean, std = _model_mean_std(tag_cfg)
    identity = BackboneIdentity(
        model_name=name,
        weights=weights,
        image_size=model.visual.image_size[0],
        layers=chosen,
        preprocess_version=PREPROCESS_VERSION,
    )
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBackbone(model.to(torch_device), tokenizer, identity, torch_device, mean, std)
