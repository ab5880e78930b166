"""Image and mask loading rules shared by every adapter.

Images load as 8-bit RGB whatever their mode; 16-bit images are scaled by their bit
depth rather than clipped. A mask pixel is anomalous when it is non-zero, so masks
stored as {0, 1}, {0, 3}, {0, 240} or {0, 255} give the same boolean mask.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

# File suffixes (lower case) that adapters accept as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_UINT16_MAX = 65535
_INT32_MAX = 2**31 - 1
_WITHOUT_ALPHA = {"LA": "L", "RGBA": "RGB", "PA": "RGB"}


def is_image_file(path: Path) -> bool:
    """Return whether ``path`` is a regular file with an image suffix."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        message = f"cannot read image {path}: {exc}; replace or remove the file"
        raise ValueError(message) from exc
    return image


def _scale_to_uint8(values: np.ndarray, full_scale: float) -> np.ndarray:
    scaled = np.clip(values.astype(np.float64), 0.0, full_scale) * (255.0 / full_scale)
    return np.rint(scaled).astype(np.uint8)


def _wide_gray_to_uint8(image: Image.Image) -> np.ndarray:
    """Map a single-channel image of more than 8 bits to ``uint8`` ``[H, W]``."""
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        return _scale_to_uint8(values, _UINT16_MAX)
    if image.mode == "F":
        # Float images in [0, 1] are scaled; anything else is taken as 8-bit values.
        full_scale = 1.0 if values.size and float(values.max()) <= 1.0 else 255.0
        return _scale_to_uint8(values, full_scale)
    # Mode "I" is 32-bit signed, and 16-bit files often open in it. Values that fit in
    # 16 bits are therefore scaled as 16-bit, wider ones by the 31-bit positive range.
    full_scale = _UINT16_MAX if values.size == 0 or int(values.max()) <= _UINT16_MAX else _INT32_MAX
    return _scale_to_uint8(values, full_scale)


def load_image(path: Path) -> Image.Image:
    """Load an image file as 8-bit RGB.

    Modes with alpha drop the alpha channel, palette images are expanded, and
    single-channel images of 16 or 32 bits are scaled by their bit depth (a constant
    1000 in a 16-bit image becomes 4).

    Args:
        path: Image file.

    Returns:
        A loaded ``PIL.Image`` in mode ``"RGB"``.

    Raises:
        ValueError: The file cannot be decoded as an image.
    """
    image = _open(Path(path))
    if image.mode.startswith("I") or image.mode == "F":
        gray = _wide_gray_to_uint8(image)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def load_mask(path: Path) -> np.ndarray:
    """Load a ground-truth mask; a pixel is anomalous when any channel is non-zero.

    Args:
        path: Mask file of the same size as its image.

    Returns:
        ``bool`` array ``[H, W]``.

    Raises:
        ValueError: The file cannot be decoded as an image.
    """
    image = _open(Path(path))
    if image.mode == "P":
        image = image.convert("RGB")
    if image.mode in _WITHOUT_ALPHA:
        # Alpha is transparency, not ground truth.
        image = image.convert(_WITHOUT_ALPHA[image.mode])
    values = np.asarray(image)
    if values.ndim == 3:
        return np.any(values != 0, axis=2)
    return values != 0


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a boolean mask with nearest-neighbour interpolation.

    Masks are never interpolated and thresholded: each output pixel copies the input
    pixel its centre falls in, so a 64x64 square in a 256x256 mask covers exactly
    56x56 = 3136 pixels at 224x224.

    Args:
        mask: ``bool`` ``[H, W]``.
        size: Output side, or ``(height, width)``.

    Returns:
        ``bool`` array ``[height, width]``.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape [H, W], got {mask.shape}")
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = image.resize((width, height), resample=Image.Resampling.NEAREST)
    return np.asarray(resized) != 0
