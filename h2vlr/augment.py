"""Training views for few-shot fitting: augmented support images and synthetic anomalies.

A view is a support image resized to ``S x S`` (the evaluation resolution), flipped and
rotated by a few degrees. An anomalous view additionally carries one synthetic defect
with a known pixel mask, made by one of two generators:

- cut-paste: a patch of random size and aspect ratio is cut from one place of the view,
  jittered in brightness, optionally rotated, and pasted at another place. The mask is
  the pasted footprint.
- Perlin blend: a thresholded Perlin noise field selects the mask, and inside it the
  view is blended with either a shifted copy of itself (another region) or a procedural
  two-colour texture.

Both generators change pixels inside the mask only. Every random draw comes from one
``numpy.random.Generator`` seeded by the caller, so a seed reproduces the views bit for
bit. Image arrays are ``uint8 [S, S, 3]``; masks are ``bool [S, S]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingView:
    """One augmented support image with its synthetic anomaly mask."""

    image: Image.Image  # RGB, size x size
    mask: np.ndarray  # bool [size, size], True on synthetic anomaly pixels
    label: int  # 1 when the mask has any True pixel, else 0


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the view augmentation and of the anomaly generators."""

    hflip_prob: float = 0.5  # probability of a horizontal flip
    vflip_prob: float = 0.5  # probability of a vertical flip
    max_rotation_deg: float = 5.0  # view angle drawn in [-max, max] degrees; 0 disables it
    cutpaste_prob: float = 0.5  # share of anomalies made by cut-paste, the rest are Perlin blends
    patch_area: tuple[float, float] = (0.02, 0.15)  # cut-paste patch area, fraction of S * S
    patch_aspect: tuple[float, float] = (0.3, 3.3)  # patch height / width, drawn log-uniformly
    brightness_jitter: float = 0.25  # patch brightness factor drawn in [1 - j, 1 + j]
    patch_rotation_prob: float = 0.5  # probability that the pasted patch is rotated
    max_patch_rotation_deg: float = 45.0  # patch angle drawn in [-max, max] degrees
    perlin_res: tuple[int, ...] = (2, 4, 8)  # noise periods across the image, one drawn per axis
    perlin_area: tuple[float, float] = (0.02, 0.2)  # Perlin mask area, fraction of S * S
    texture_prob: float = 0.5  # share of Perlin blends that use a procedural texture
    blend_opacity: tuple[float, float] = (0.5, 1.0)  # weight of the blended source in the mask

    def __post_init__(self) -> None:
        for name in (
            "hflip_prob",
            "vflip_prob",
            "cutpaste_prob",
            "patch_rotation_prob",
            "texture_prob",
        ):
            _check_probability(name, getattr(self, name))
        for name in ("patch_area", "perlin_area", "blend_opacity"):
            _check_range(name, getattr(self, name), low=0.0, high=1.0)
        _check_range("patch_aspect", self.patch_aspect, low=0.0, high=math.inf)
        if self.patch_aspect[0] <= 0.0:
            raise ValueError(f"patch_aspect must be positive, got {self.patch_aspect}")
        if not 0.0 <= self.brightness_jitter < 1.0:
            raise ValueError(
                f"brightness_jitter must lie in [0, 1) so that the factor 1 - j stays positive, "
                f"got {self.brightness_jitter}"
            )
        if self.max_rotation_deg < 0 or self.max_patch_rotation_deg < 0:
            raise ValueError(
                "rotation limits must be non-negative, got "
                f"max_rotation_deg={self.max_rotation_deg}, "
                f"max_patch_rotation_deg={self.max_patch_rotation_deg}"
            )
        if not self.perlin_res or any(int(r) < 1 for r in self.perlin_res):
            raise ValueError(
                f"perlin_res must be a non-empty tuple of integers >= 1, got {self.perlin_res}"
            )


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float) -> None:
    if len(bounds) != 2 or not low <= bounds[0] <= bounds[1] <= high:
        raise ValueError(
            f"{name} must be a (min, max) pair with {low} <= min <= max <= {high}, got {bounds}"
        )


def make_training_views(
    images: Sequence[Image.Image],
    size: int,
    n_views: int,
    seed: int,
    anomaly_fraction: float = 0.5,
    config: AugmentConfig | None = None,
) -> list[TrainingView]:
    """Make ``n_views`` augmented views of the support images, some with synthetic anomalies.

    View ``j`` comes from ``images[j % len(images)]``, so the caller fixes which image
    each view uses by the order of ``images``. Exactly ``round(n_views * anomaly_fraction)``
    views are anomalous, at positions drawn from the seeded generator.

    Args:
        images: support images, any PIL mode; converted to RGB.
        size: side ``S`` of the square views in pixels.
        n_views: number of views to return.
        seed: seed of the single random generator behind every draw.
        anomaly_fraction: share of views that carry a synthetic anomaly, in [0, 1].
        config: augmentation parameters; defaults to ``AugmentConfig()``.

    Returns:
        ``n_views`` views; each image is RGB ``S x S`` and each mask ``bool [S, S]``.

    Raises:
        ValueError: on an empty image list, a size below 8, a negative ``n_views`` or an
            ``anomaly_fraction`` outside [0, 1].
    """
    config = config or AugmentConfig()
    _validate_request(images, size, n_views, anomaly_fraction)
    rng = np.random.default_rng(seed)

    bases = [_to_rgb_array(image, size) for image in images]
    n_anomalous = round(n_views * anomaly_fraction)
    is_anomalous = rng.permutation(n_views) < n_anomalous

    views = []
    for j in range(n_views):
        pixels = augment_geometry(bases[j % len(bases)], rng, config)
        if is_anomalous[j]:
            pixels, mask = synthesize_anomaly(pixels, rng, config)
        else:
            mask = np.zeros((size, size), dtype=bool)
        views.append(TrainingView(Image.fromarray(pixels), mask, int(mask.any())))
    logger.debug(
        "made %d training views (%d anomalous) from %d support images at %d px",
        n_views,
        n_anomalous,
        len(images),
        size,
    )
    return views


def _validate_request(
    images: Sequence[Image.Image], size: int, n_views: int, anomaly_fraction: float
) -> None:
    if len(images) == 0:
        raise ValueError("images is empty; pass at least one support image")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    if n_views < 0:
        raise ValueError(f"n_views must be non-negative, got {n_views}")
    if not 0.0 <= anomaly_fraction <= 1.0:
        raise ValueError(f"anomaly_fraction must lie in [0, 1], got {anomaly_fraction}")


def _to_rgb_array(image: Image.Image, size: int) -> np.ndarray:
    """Return the image as ``uint8 [size, size, 3]``, resized with bicubic interpolation."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8).copy()


def augment_geometry(
    pixels: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    """Flip and rotate an image by a small angle, reflecting it at the border.

    Args:
        pixels: ``uint8 [S, S, 3]`` image.
        rng: generator for the flip and angle draws.
        config: flip probabilities and rotation limit.

    Returns:
        A new ``uint8 [S, S, 3]`` image; the input is left unchanged.
    """
    out = pixels
    if rng.random() < config.hflip_prob:
        out = out[:, ::-1]
    if rng.random() < config.vflip_prob:
        out = out[::-1]
    if config.max_rotation_deg > 0:
        angle = rng.uniform(-config.max_rotation_deg, config.max_rotation_deg)
        rotated = ndimage.rotate(
            out.astype(np.float32), angle, axes=(1, 0), reshape=False, order=1, mode="reflect"
        )
        out = _to_uint8(rotated)
    return np.ascontiguousarray(out)


def synthesize_anomaly(
    pixels: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Add one synthetic defect, by cut-paste or by a Perlin blend as ``config`` weighs them.

    Returns:
        The ``uint8 [S, S, 3]`` image with the defect and its non-empty ``bool [S, S]`` mask.
    """
    if rng.random() < config.cutpaste_prob:
        return cut_paste(pixels, rng, config)
    return perlin_blend(pixels, rng, config)


def cut_paste(
    pixels: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a patch from one place of the image and paste it at another.

    The patch has a random area and aspect ratio, a random brightness factor and, with
    probability ``config.patch_rotation_prob``, a rotation inside its own box. Pixels
    outside the pasted footprint are not changed.

    Args:
        pixels: ``uint8 [S, S, 3]`` image.
        rng: generator for every draw.
        config: patch size, aspect, jitter and rotation parameters.

    Returns:
        The new ``uint8 [S, S, 3]`` image and the ``bool [S, S]`` footprint mask (never empty).
    """
    height, width = pixels.shape[:2]
    patch_h, patch_w = _draw_patch_size(height, width, rng, config)
    src_y = int(rng.integers(0, height - patch_h + 1))
    src_x = int(rng.integers(0, width - patch_w + 1))
    dst_y, dst_x = _draw_destination(height, width, patch_h, patch_w, (src_y, src_x), rng)

    patch = pixels[src_y : src_y + patch_h, src_x : src_x + patch_w].astype(np.float32)
    patch = patch * rng.uniform(1.0 - config.brightness_jitter, 1.0 + config.brightness_jitter)
    footprint = np.ones((patch_h, patch_w), dtype=bool)
    if rng.random() < config.patch_rotation_prob:
        angle = rng.uniform(-config.max_patch_rotation_deg, config.max_patch_rotation_deg)
        patch, footprint = _rotate_patch(patch, angle)

    out = pixels.copy()
    region = out[dst_y : dst_y + patch_h, dst_x : dst_x + patch_w]
    region[footprint] = _to_uint8(patch)[footprint]
    mask = np.zeros((height, width), dtype=bool)
    mask[dst_y : dst_y + patch_h, dst_x : dst_x + patch_w] = footprint
    return out, mask


def _draw_destination(
    height: int,
    width: int,
    patch_h: int,
    patch_w: int,
    source: tuple[int, int],
    rng: np.random.Generator,
    max_draws: int = 10,
) -> tuple[int, int]:
    """Draw the top-left corner of the paste, redrawing while it equals the source corner.

    A patch as large as the image has only one position, so the source corner is then
    returned and the anomaly is the brightness and rotation change alone.
    """
    corner = source
    for _ in range(max_draws):
        corner = (
            int(rng.integers(0, height - patch_h + 1)),
            int(rng.integers(0, width - patch_w + 1)),
        )
        if corner != source:
            break
    return corner


def _draw_patch_size(
    height: int, width: int, rng: np.random.Generator, config: AugmentConfig
) -> tuple[int, int]:
    """Draw a patch ``(h, w)`` in pixels from the configured area and log-uniform aspect."""
    area = rng.uniform(*config.patch_area) * height * width
    log_aspect = rng.uniform(math.log(config.patch_aspect[0]), math.log(config.patch_aspect[1]))
    aspect = math.exp(log_aspect)
    patch_h = min(height, max(1, round(math.sqrt(area * aspect))))
    patch_w = min(width, max(1, round(math.sqrt(area / aspect))))
    return patch_h, patch_w


def _rotate_patch(patch: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a ``[h, w, 3]`` patch inside its box; return it and its ``bool [h, w]`` footprint."""
    rotated = ndimage.rotate(patch, angle, axes=(1, 0), reshape=False, order=1, mode="constant")
    inside = np.ones(patch.shape[:2], dtype=np.float32)
    footprint = ndimage.rotate(inside, angle, axes=(1, 0), reshape=False, order=0) > 0.5
    # The centre pixel maps onto itself, but a 1- or 2-pixel patch can lose it to rounding.
    footprint[patch.shape[0] // 2, patch.shape[1] // 2] = True
    return rotated, footprint


def perlin_blend(
    pixels: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Blend another region of the image, or a procedural texture, into a Perlin-shaped mask.

    The mask keeps the highest ``a`` share of a Perlin noise field, with ``a`` drawn from
    ``config.perlin_area``. With probability ``config.texture_prob`` the source is a
    two-colour Perlin texture, otherwise the image shifted by a random offset of a quarter
    to three quarters of its size. Inside the mask the result is
    ``(1 - beta) * image + beta * source`` with ``beta`` drawn from ``config.blend_opacity``;
    outside it the image is unchanged.

    Returns:
        The new ``uint8 [S, S, 3]`` image and its ``bool [S, S]`` mask (never empty).
    """
    height, width = pixels.shape[:2]
    mask = _perlin_mask((height, width), rng, config)
    if rng.random() < config.texture_prob:
        source = _procedural_texture((height, width), rng, config)
    else:
        source = _shifted_copy(pixels, rng)
    beta = rng.uniform(*config.blend_opacity)

    out = pixels.copy()
    blended = (1.0 - beta) * pixels[mask].astype(np.float32) + beta * source[mask]
    out[mask] = _to_uint8(blended)
    return out, mask


def _perlin_mask(
    shape: tuple[int, int], rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    """Threshold a Perlin field at the quantile that keeps a drawn share of the pixels."""
    res = (int(rng.choice(config.perlin_res)), int(rng.choice(config.perlin_res)))
    noise = perlin_noise(shape, res, rng)
    area = rng.uniform(*config.perlin_area)
    threshold = np.quantile(noise, 1.0 - area)
    mask = noise >= threshold
    # A flat field (possible only for degenerate shapes) still yields its maximum pixel.
    if not mask.any():
        mask.flat[int(np.argmax(noise))] = True
    return mask


def _procedural_texture(
    shape: tuple[int, int], rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    """Return a ``float32 [H, W, 3]`` texture mixing two random colours by a Perlin field."""
    res = int(rng.choice(config.perlin_res)) * 2
    field = perlin_noise(shape, (res, res), rng)
    weight = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
    colours = rng.uniform(0.0, 255.0, size=(2, 3)).astype(np.float32)
    return (1.0 - weight[..., None]) * colours[0] + weight[..., None] * colours[1]


def _shifted_copy(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return the image rolled by a random offset, so each pixel shows another region."""
    height, width = pixels.shape[:2]
    dy = int(rng.integers(height // 4, max(height // 4 + 1, 3 * height // 4)))
    dx = int(rng.integers(width // 4, max(width // 4 + 1, 3 * width // 4)))
    return np.roll(pixels, (dy, dx), axis=(0, 1)).astype(np.float32)


def perlin_noise(
    shape: tuple[int, int], res: int | tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Sample 2-D Perlin gradient noise on a pixel grid.

    The image spans ``res`` lattice cells along each axis, and each lattice corner gets a
    random unit gradient. A pixel's value interpolates the dot products of the four
    surrounding corner gradients with the pixel's offsets from those corners, bilinearly
    with quintic fade weights. The field is zero at lattice corners, smooth, and lies in
    ``[-sqrt(2)/2, sqrt(2)/2]``.

    Args:
        shape: output ``(H, W)`` in pixels.
        res: lattice cells along ``(H, W)``, or one count for both axes; each at least 1.
        rng: generator for the gradient angles.

    Returns:
        ``float32 [H, W]`` noise.

    Raises:
        ValueError: if a shape or res entry is below 1.
    """
    res_y, res_x = (res, res) if isinstance(res, int) else res
    height, width = shape
    if height < 1 or width < 1 or res_y < 1 or res_x < 1:
        raise ValueError(f"shape and res must be positive, got shape={shape}, res={res}")

    angles = rng.uniform(0.0, 2.0 * math.pi, size=(res_y + 1, res_x + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # [res_y + 1, res_x + 1, 2]

    # Lattice coordinates of pixel centres: cell index and offset inside the cell.
    y = (np.arange(height) + 0.5) * res_y / height
    x = (np.arange(width) + 0.5) * res_x / width
    cell_y, cell_x = np.floor(y).astype(int), np.floor(x).astype(int)
    frac_y, frac_x = np.meshgrid(y - cell_y, x - cell_x, indexing="ij")  # [H, W] each
    gy, gx = np.meshgrid(cell_y, cell_x, indexing="ij")

    def corner_dot(dy: int, dx: int) -> np.ndarray:
        grad = gradients[gy + dy, gx + dx]  # [H, W, 2]
        return grad[..., 0] * (frac_y - dy) + grad[..., 1] * (frac_x - dx)

    fade_y, fade_x = _fade(frac_y), _fade(frac_x)
    top = corner_dot(0, 0) * (1 - fade_x) + corner_dot(0, 1) * fade_x
    bottom = corner_dot(1, 0) * (1 - fade_x) + corner_dot(1, 1) * fade_x
    return (top * (1 - fade_y) + bottom * fade_y).astype(np.float32)


def _fade(t: np.ndarray) -> np.ndarray:
    """Quintic ease curve ``6t^5 - 15t^4 + 10t^3``: zero first and second derivative at 0 and 1."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
