"""Content-addressed feature cache and batched feature extraction.

Shapes: ``B`` images, ``L`` feature layers, ``N`` patches per image (``gh * gw``),
``D`` joint image-text embedding width, ``S`` evaluation resolution.

A cache entry contains the features of one image file. Its key is the sha256 of the
backbone identity (model name, weights identity, image size, layer indices,
preprocessing version), the sha256 of the image file's bytes and the kind of
computation, so any change to one of them selects another entry. Entries live under
``<cache_dir>/features/<backbone dir>/<key[:2]>/<key>.safetensors``, one backbone
directory per model and weights identity, with a ``backbone.json`` naming them.
Floating-point values are stored as float16.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from h2vlr.backbone import BackboneIdentity, ClipBackbone
from h2vlr.data.loading import load_image
from h2vlr.paths import default_cache_dir, file_sha256

logger = logging.getLogger(__name__)

EntryCheck = Callable[[dict[str, torch.Tensor]], bool]

FEATURES_KIND = "features"  # the kind of the global embedding and patch token entries
ENTRY_SUFFIX = ".safetensors"
BACKBONE_FILE = "backbone.json"


@dataclass(frozen=True)
class Features:
    """Image features of ``B`` images, in the order they were requested."""

    global_embeds: torch.Tensor  # [B, D] float32
    patch_tokens: torch.Tensor  # [B, L, N, D] float32
    grid_size: tuple[int, int]  # (gh, gw), N = gh * gw

    def __len__(self) -> int:
        return self.global_embeds.shape[0]

    def index(self, idx: Sequence[int]) -> Features:
        """Select images by position; returns ``Features`` of ``len(idx)`` images."""
        rows = torch.as_tensor(list(idx), dtype=torch.long)
        return Features(self.global_embeds[rows], self.patch_tokens[rows], self.grid_size)


@dataclass
class ExtractionStats:
    """Counters of backbone passes and cache use, recorded with each run."""

    encoded: int = 0  # images whose features were computed by the backbone
    cache_hits: int = 0  # images whose features were read from the cache
    views_encoded: int = 0  # uncached images (augmented views) passed to the backbone
    extra_computed: int = 0  # images passed to an extract_extra computation
    extra_cache_hits: int = 0  # images whose extract_extra values came from the cache

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class BackboneUsage:
    """Cache use of one backbone (model and weights identity)."""

    model_name: str
    weights: str
    entries: int  # number of cached image entries, all kinds together
    bytes: int  # total size of the entry files


# ----------------------------------------------------------------------------- keys


def image_sha256(path: Path) -> str:
    """Return the sha256 hex digest of an image file's bytes."""
    return file_sha256(path)


def cache_key(identity: BackboneIdentity, image_digest: str, kind: str = FEATURES_KIND) -> str:
    """Return the entry key: sha256 of the backbone identity, image digest and kind."""
    fields = {
        "model_name": identity.model_name,
        "weights": identity.weights,
        "image_size": identity.image_size,
        "layers": list(identity.layers),
        "preprocess_version": identity.preprocess_version,
        "image_sha256": image_digest,
        "kind": kind,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _backbone_dir_name(identity: BackboneIdentity) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", identity.model_name)
    weights_digest = hashlib.sha256(identity.weights.encode()).hexdigest()[:12]
    return f"{slug}-{weights_digest}"


# ----------------------------------------------------------------------------- cache


class FeatureCache:
    """Per-image cache entries on disk, safe for concurrent writers.

    A writer saves to a temporary file in the entry's directory and renames it with
    ``os.replace``, so a reader sees either no entry or a complete one. An entry that
    cannot be read (truncated or corrupt) is logged and treated as missing.
    """

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.root = self.cache_dir / "features"

    def entry_path(self, identity: BackboneIdentity, key: str) -> Path:
        """Return the file of the entry ``key`` (it may not exist)."""
        return self.root / _backbone_dir_name(identity) / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def load(self, identity: BackboneIdentity, key: str) -> dict[str, torch.Tensor] | None:
        """Read an entry; returns None when it is missing, truncated or corrupt."""
        path = self.entry_path(identity, key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            values = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            logger.warning("Corrupt feature cache entry %s (%s); recomputing it", path, exc)
            return None
        if not values:
            logger.warning("Empty feature cache entry %s; recomputing it", path)
            return None
        return values

    def save(self, identity: BackboneIdentity, key: str, values: dict[str, torch.Tensor]) -> None:
        """Write an entry atomically; floating-point tensors are stored as float16."""
        path = self.entry_path(identity, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_backbone_file(identity)
        stored = {
            name: (tensor.half() if tensor.is_floating_point() else tensor).contiguous().cpu()
            for name, tensor in values.items()
        }
        _atomic_write(path, save_safetensors(stored))

    def _write_backbone_file(self, identity: BackboneIdentity) -> None:
        path = self.root / _backbone_dir_name(identity) / BACKBONE_FILE
        if path.exists():
            return
        text = json.dumps({"model_name": identity.model_name, "weights": identity.weights})
        _atomic_write(path, text.encode())

    def _backbone_dirs(self) -> Iterator[Path]:
        if self.root.is_dir():
            yield from sorted(p for p in self.root.iterdir() if p.is_dir())

    def usage(self) -> list[BackboneUsage]:
        """Count entries and bytes per backbone directory."""
        rows = []
        for directory in self._backbone_dirs():
            names = _read_backbone_file(directory)
            files = list(directory.glob(f"*/*{ENTRY_SUFFIX}"))
            size = sum(f.stat().st_size for f in files)
            rows.append(BackboneUsage(names["model_name"], names["weights"], len(files), size))
        return rows

    def clear(self) -> BackboneUsage:
        """Delete every entry; returns the totals removed (model and weights ``*``)."""
        rows = self.usage()
        if self.root.is_dir():
            shutil.rmtree(self.root)
        return BackboneUsage("*", "*", sum(r.entries for r in rows), sum(r.bytes for r in rows))


def _read_backbone_file(directory: Path) -> dict[str, str]:
    try:
        names = json.loads((directory / BACKBONE_FILE).read_text())
        return {"model_name": str(names["model_name"]), "weights": str(names["weights"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"model_name": directory.name, "weights": "unknown"}


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- extraction


def _read_image(path: Path) -> Image.Image:
    return load_image(path)


def _image_rate_column():
    """Build a Rich progress column that shows images per second."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ImageRateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} images/s" if speed else "- images/s")

    return ImageRateColumn()


class FeatureExtractor:
    """Batched feature extraction through a ``FeatureCache``.

    Features returned by ``extract`` are rounded to float16 precision and returned as
    float32 whether or not they came from the cache, so results do not depend on the
    state of the cache.

    Args:
        backbone: the frozen backbone that computes missing features.
        cache: where entries are read and written; None computes every image.
        batch_size: images per backbone forward.
        progress: show a Rich progress bar (images, images/s) while computing.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        cache: FeatureCache | None,
        batch_size: int = 16,
        progress: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"invalid batch_size {batch_size}: expected a positive integer")
        self.backbone = backbone
        self.cache = cache
        self.batch_size = batch_size
        self.progress = progress
        self.stats = ExtractionStats()

    # -- cached per-image computations

    def _lookup(
        self, paths: Sequence[Path], kind: str, validate: EntryCheck | None
    ) -> tuple[list[str], dict[int, dict[str, torch.Tensor]]]:
        """Return the entry key of each path and the cached values found, by position."""
        identity = self.backbone.identity
        keys = [cache_key(identity, image_sha256(Path(p)), kind) for p in paths]
        found: dict[int, dict[str, torch.Tensor]] = {}
        if self.cache is not None:
            for position, key in enumerate(keys):
                values = self.cache.load(identity, key)
                if values is not None and validate is not None and not validate(values):
                    path = self.cache.entry_path(identity, key)
                    logger.warning(
                        "Feature cache entry %s has unexpected tensors; recomputing it", path
                    )
                    values = None
                if values is not None:
                    found[position] = values
        return keys, found

    def _pixels(self, paths: Sequence[Path]) -> torch.Tensor:
        images = [self.backbone.preprocess_image(_read_image(Path(p))) for p in paths]
        return torch.stack(images).to(self.backbone.device)  # [B, 3, S, S]

    def _compute_missing(
        self,
        paths: Sequence[Path],
        keys: list[str],
        missing: list[int],
        compute: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        label: str,
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Run ``compute`` over the missing positions in batches and cache each image."""
        computed: dict[int, dict[str, torch.Tensor]] = {}
        enabled = self.progress and len(missing) > 0
        with _progress(len(missing), label, enabled) as advance:
            for start in range(0, len(missing), self.batch_size):
                batch = missing[start : start + self.batch_size]
                outputs = compute(self._pixels([paths[i] for i in batch]))
                _check_batch_outputs(outputs, len(batch), label)
                for row, position in enumerate(batch):
                    values = {name: tensor[row].detach().cpu() for name, tensor in outputs.items()}
                    values = {name: _round_half(t) for name, t in values.items()}
                    if self.cache is not None:
                        self.cache.save(self.backbone.identity, keys[position], values)
                    computed[position] = values
                advance(len(batch))
        return computed

    def _cached_batches(
        self,
        paths: Sequence[Path],
        kind: str,
        compute: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        validate: EntryCheck | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], int, int]:
        """Return per-image values in ``paths`` order, the hit count and the computed count."""
        keys, found = self._lookup(paths, kind, validate)
        missing = [i for i in range(len(paths)) if i not in found]
        computed = self._compute_missing(paths, keys, missing, compute, kind)
        values = [found[i] if i in found else computed[i] for i in range(len(paths))]
        return [{k: _as_float32(t) for k, t in v.items()} for v in values], len(found), len(missing)

    # -- public API

    def extract(self, paths: Sequence[Path]) -> Features:
        """Return the features of image files, computing and caching the missing ones.

        Args:
            paths: image files; the same file content always maps to the same entry.

        Returns:
            ``Features`` with ``B = len(paths)`` in the order of ``paths``, on the CPU.
        """
        if not paths:
            return self._empty_features()

        def encode(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
            global_embeds, patch_tokens = self.backbone.encode_images(pixels)
            return {"global_embeds": global_embeds, "patch_tokens": patch_tokens}

        values, hits, computed = self._cached_batches(
            paths, FEATURES_KIND, encode, self._is_feature_entry
        )
        self.stats.cache_hits += hits
        self.stats.encoded += computed
        return Features(
            global_embeds=torch.stack([v["global_embeds"] for v in values]),
            patch_tokens=torch.stack([v["patch_tokens"] for v in values]),
            grid_size=self.backbone.grid_size,
        )

    def _is_feature_entry(self, values: dict[str, torch.Tensor]) -> bool:
        backbone = self.backbone
        patches = backbone.grid_size[0] * backbone.grid_size[1]
        expected = {
            "global_embeds": (backbone.embed_dim,),
            "patch_tokens": (len(backbone.layers), patches, backbone.embed_dim),
        }
        shapes = {name: tuple(tensor.shape) for name, tensor in values.items()}
        return shapes == expected

    def extract_extra(
        self,
        paths: Sequence[Path],
        kind: str,
        compute: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Cache any other per-image computation on the preprocessed pixels.

        Args:
            paths: image files.
            kind: names the computation and its parameters (for example
                ``"winclip-windows:2,3"``); part of the entry key.
            compute: maps pixels ``[B, 3, S, S]`` on the backbone's device to tensors
                whose first dimension is ``B``.

        Returns:
            Each output name mapped to a tensor ``[len(paths), ...]``, floating-point
            values as float32 rounded to float16 precision.
        """
        if kind == FEATURES_KIND:
            raise ValueError(
                f"invalid kind {kind!r}: it is reserved for extract(); choose another name"
            )
        if not paths:
            return {}
        values, hits, computed = self._cached_batches(paths, kind, compute)
        self.stats.extra_cache_hits += hits
        self.stats.extra_computed += computed
        return {name: torch.stack([v[name] for v in values]) for name in values[0]}

    def encode_views(self, images: Sequence[Image.Image]) -> Features:
        """Encode in-memory images (augmented views) without the cache.

        Returns:
            ``Features`` with ``B = len(images)``, float32 at full precision.
        """
        if not images:
            return self._empty_features()
        globals_, patches = [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            pixels = torch.stack([self.backbone.preprocess_image(im) for im in batch])
            global_embeds, patch_tokens = self.backbone.encode_images(pixels)
            globals_.append(global_embeds.cpu())
            patches.append(patch_tokens.cpu())
        self.stats.views_encoded += len(images)
        return Features(torch.cat(globals_), torch.cat(patches), self.backbone.grid_size)

    def _empty_features(self) -> Features:
        backbone = self.backbone
        patches = backbone.grid_size[0] * backbone.grid_size[1]
        return Features(
            torch.zeros(0, backbone.embed_dim),
            torch.zeros(0, len(backbone.layers), patches, backbone.embed_dim),
            backbone.grid_size,
        )


def _round_half(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.half() if tensor.is_floating_point() else tensor


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def _check_batch_outputs(outputs: dict[str, torch.Tensor], batch: int, kind: str) -> None:
    if not outputs:
        raise ValueError(f"computation {kind!r} returned no tensors; expected a non-empty dict")
    for name, tensor in outputs.items():
        if tensor.ndim == 0 or tensor.shape[0] != batch:
            message = (
                f"computation {kind!r} returned {name!r} with shape {tuple(tensor.shape)}; "
                f"expected a first dimension of {batch} (one row per image)"
            )
            raise ValueError(message)


@contextlib.contextmanager
def _progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draw a Rich bar (images, images/s) only when enabled."""
    if not enabled:
        yield lambda count: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        _image_rate_column(),
    ) as bar:
        task = bar.add_task(f"Encoding ({label})", total=total)
        yield lambda count: bar.advance(task, count)
