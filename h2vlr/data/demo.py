"""The procedural ``demo`` dataset: small textures and one object with visible defects.

The tree follows the MVTec AD layout and is generated on first use under
``default_cache_dir() / "datasets" / "demo" / DEMO_VERSION``. Every image is drawn from
a generator seeded by a SHA-256 digest of its category, split, defect type and index,
so two generations with the same NumPy give the same files. Normal images of a category
differ only by a little brightness change, sensor noise and (stripes) a small phase
shift. Defects (scratches, holes, stains, missing parts) are large and contrasting, so
that even random-weight features separate normal from anomalous images.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from h2vlr.data.mvtec import MVTecAdapter
from h2vlr.data.registry import register_dataset
from h2vlr.data.splits import stable_digest
from h2vlr.data.types import DatasetError
from h2vlr.paths import CACHE_DIR_ENV, default_cache_dir

logger = logging.getLogger(__name__)

# Bump when any generated pixel changes; the version names the cache directory.
DEMO_VERSION = "v1"
IMAGE_SIZE = 128  # side of every demo image and mask, pixels
TRAIN_GOOD = 16  # normal training images per category
TEST_GOOD = 8  # normal test images per category
TEST_PER_DEFECT = 4  # anomalous test images per defect type
NOISE_STD = 3.0  # sensor noise, 8-bit grey levels

# Images are float arrays [H, W, 3] in 0..255; masks and object regions bool [H, W].
Canvas = np.ndarray
Color = tuple[int, int, int]
Renderer = Callable[[np.random.Generator], tuple[Canvas, np.ndarray]]
# A defect draws into the image in place, inside the region, and returns its mask.
# The colour argument is the category's scratch colour, which only scratches use.
Defect = Callable[[Canvas, np.ndarray, np.random.Generator, Color], np.ndarray]


@dataclass(frozen=True)
class DemoCategory:
    """Drawing recipe of one demo category."""

    render: Renderer  # draws a normal image and the region defects may touch
    defects: tuple[str, ...]  # defect types, each a key of DEFECTS
    scratch_color: Color  # RGB of scratches on this surface


def _grid() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    return yy.astype(np.float64), xx.astype(np.float64)


def _mix(a: tuple[float, ...], b: tuple[float, ...], weight: np.ndarray) -> Canvas:
    """Blend two RGB colours per pixel; ``weight`` [H, W] in 0..1 selects ``b``."""
    w = weight[..., None]
    return (1.0 - w) * np.asarray(a, dtype=np.float64) + w * np.asarray(b, dtype=np.float64)


def _render_checkered(rng: np.random.Generator) -> tuple[Canvas, np.ndarray]:
    yy, xx = _grid()
    cells = (yy // 16 + xx // 16) % 2
    image = _mix((205.0, 192.0, 168.0), (92.0, 78.0, 66.0), cells)
    image *= rng.uniform(0.97, 1.03)
    return image, np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)


def _render_striped(rng: np.random.Generator) -> tuple[Canvas, np.ndarray]:
    yy, xx = _grid()
    phase = rng.uniform(-0.2, 0.2)
    wave = 0.5 + 0.5 * np.sin(2.0 * np.pi * (xx + yy) / 16.0 + phase)
    image = _mix((38.0, 58.0, 122.0), (222.0, 212.0, 182.0), wave)
    image *= rng.uniform(0.97, 1.03)
    return image, np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)


def _washer_geometry() -> tuple[np.ndarray, np.ndarray]:
    """Return the ring region (bool) and each pixel's angle around the centre (radians)."""
    yy, xx = _grid()
    centre = IMAGE_SIZE / 2
    radius = np.hypot(yy - centre, xx - centre)
    angle = np.arctan2(yy - centre, xx - centre)
    ring = (radius >= 18.0) & (radius <= 44.0)
    return ring, angle


def _washer_background() -> Canvas:
    yy, _ = _grid()
    shade = 48.0 + 10.0 * yy / IMAGE_SIZE
    return np.repeat(shade[..., None], 3, axis=2) * np.array([1.0, 1.0, 1.08])


def _render_washer(rng: np.random.Generator) -> tuple[Canvas, np.ndarray]:
    ring, angle = _washer_geometry()
    metal = 172.0 + 28.0 * np.cos(angle - 0.8)
    metal_rgb = np.stack([metal, metal, metal * 1.04], axis=2)
    image = np.where(ring[..., None], metal_rgb, _washer_background())
    image *= rng.uniform(0.97, 1.03)
    return image, ring


def _point_in(region: np.ndarray, rng: np.random.Generator, margin: int) -> tuple[float, float]:
    """Pick a pixel of ``region`` at least ``margin`` pixels from the border."""
    inner = np.zeros_like(region)
    inner[margin:-margin, margin:-margin] = region[margin:-margin, margin:-margin]
    ys, xs = np.nonzero(inner)
    index = int(rng.integers(len(ys)))
    return float(ys[index]), float(xs[index])


def _scratch(
    image: Canvas, region: np.ndarray, rng: np.random.Generator, color: Color
) -> np.ndarray:
    yy, xx = _grid()
    cy, cx = _point_in(region, rng, margin=24)
    theta = rng.uniform(0.0, np.pi)
    half = rng.uniform(22.0, 34.0)
    dy, dx = np.sin(theta), np.cos(theta)
    # Distance of each pixel to the segment centred at (cy, cx) with half-length `half`.
    along = np.clip((yy - cy) * dy + (xx - cx) * dx, -half, half)
    distance = np.hypot(yy - (cy + along * dy), xx - (cx + along * dx))
    mask = (distance <= 2.2) & region
    image[mask] = color
    return mask


def _hole(image: Canvas, region: np.ndarray, rng: np.random.Generator, color: Color) -> np.ndarray:
    yy, xx = _grid()
    cy, cx = _point_in(region, rng, margin=16)
    radius = rng.uniform(8.0, 12.0)
    mask = (np.hypot(yy - cy, xx - cx) <= radius) & region
    image[mask] = (14.0, 12.0, 10.0)
    return mask


def _stain(image: Canvas, region: np.ndarray, rng: np.random.Generator, color: Color) -> np.ndarray:
    yy, xx = _grid()
    cy, cx = _point_in(region, rng, margin=18)
    a, b = rng.uniform(10.0, 16.0, size=2)
    theta = rng.uniform(0.0, np.pi)
    u = (yy - cy) * np.cos(theta) + (xx - cx) * np.sin(theta)
    v = -(yy - cy) * np.sin(theta) + (xx - cx) * np.cos(theta)
    mask = ((u / a) ** 2 + (v / b) ** 2 <= 1.0) & region
    image[mask] = 0.3 * image[mask] + 0.7 * np.array([150.0, 96.0, 18.0])
    return mask


def _missing_part(
    image: Canvas, region: np.ndarray, rng: np.random.Generator, color: Color
) -> np.ndarray:
    # Washer only: a wedge of the ring is gone and the background shows through.
    yy, xx = _grid()
    cy, cx = yy[region].mean(), xx[region].mean()
    angle = np.arctan2(yy - cy, xx - cx)
    start = rng.uniform(-np.pi, np.pi)
    width = rng.uniform(0.6, 1.0)  # radians
    offset = np.mod(angle - start, 2.0 * np.pi)
    mask = (offset <= width) & region
    image[mask] = _washer_background()[mask]
    return mask


DEFECTS: dict[str, Defect] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "missing_part": _missing_part,
}

DEMO_CATEGORIES = {
    "checkered_tile": DemoCategory(
        _render_checkered, ("hole", "scratch", "stain"), (236, 248, 255)
    ),
    "striped_fabric": DemoCategory(_render_striped, ("hole", "scratch", "stain"), (250, 40, 30)),
    "metal_washer": DemoCategory(
        _render_washer, ("missing_part", "scratch", "stain"), (30, 30, 30)
    ),
}


def _rng(*parts: str) -> np.random.Generator:
    return np.random.default_rng(int(stable_digest("demo", DEMO_VERSION, *parts)[:16], 16))


def _finish(image: Canvas, rng: np.random.Generator) -> np.ndarray:
    noisy = image + rng.normal(0.0, NOISE_STD, size=image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def render_demo_image(
    category: str, split: str, defect: str, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one demo image.

    Args:
        category: A key of ``DEMO_CATEGORIES``.
        split: ``"train"`` or ``"test"``.
        defect: ``"good"`` or one of the category's defect types.
        index: Image number within its directory.

    Returns:
        ``(image, mask)``: ``uint8`` ``[IMAGE_SIZE, IMAGE_SIZE, 3]`` and ``bool``
        ``[IMAGE_SIZE, IMAGE_SIZE]`` (all False for normal images).
    """
    spec = DEMO_CATEGORIES[category]
    rng = _rng(category, split, defect, str(index))
    image, region = spec.render(rng)
    mask = np.zeros(region.shape, dtype=bool)
    if defect != "good":
        mask = DEFECTS[defect](image, region, rng, spec.scratch_color)
    return _finish(image, rng), mask


def write_demo_tree(target: Path) -> None:
    """Write every demo category into ``target`` in MVTec AD layout."""
    for category, spec in DEMO_CATEGORIES.items():
        base = target / category
        for index in range(TRAIN_GOOD):
            image, _ = render_demo_image(category, "train", "good", index)
            _save(image, base / "train" / "good" / f"{index:03d}.png")
        for index in range(TEST_GOOD):
            image, _ = render_demo_image(category, "test", "good", index)
            _save(image, base / "test" / "good" / f"{index:03d}.png")
        for defect in spec.defects:
            for index in range(TEST_PER_DEFECT):
                image, mask = render_demo_image(category, "test", defect, index)
                _save(image, base / "test" / defect / f"{index:03d}.png")
                mask_png = mask.astype(np.uint8) * 255
                _save(mask_png, base / "ground_truth" / defect / f"{index:03d}_mask.png")


def default_demo_root() -> Path:
    """Return the cache directory of the current demo version."""
    return default_cache_dir() / "datasets" / "demo" / DEMO_VERSION


def ensure_demo(target: Path) -> Path:
    """Generate the demo tree at ``target`` unless it exists; return ``target``.

    The tree is written into a temporary sibling directory and renamed into place, so a
    reader never sees a partial tree. When several processes generate at once, the first
    rename wins and the others discard their copy.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        write_demo_tree(staging)
        try:
            os.rename(staging, target)
            logger.info("generated the demo dataset at %s", target)
        except OSError:
            if not target.is_dir():
                raise
            logger.info("demo dataset at %s was generated by another process", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class DemoAdapter(MVTecAdapter):
    """MVTec-layout reader that generates the procedural tree when it is missing."""

    name = "demo"
    description = (
        "procedural textures and an object with scratches, holes, stains and missing parts; "
        "generated into the cache on first use, no --data-root needed"
    )

    def resolve_root(self, root: Path | None) -> Path:
        """Return ``root`` (or the cache directory when None), generating the tree if missing.

        Raises:
            DatasetError: The tree cannot be generated there.
        """
        target = default_demo_root() if root is None else Path(root).expanduser().absolute()
        if target.exists() and not target.is_dir():
            raise DatasetError(
                f"demo root {target} is a file; pass a directory or omit --data-root"
            )
        try:
            ensure_demo(target)
        except OSError as exc:
            raise DatasetError(
                f"cannot generate the demo dataset at {target}: {exc}; set {CACHE_DIR_ENV} "
                "to a writable directory or pass a writable --data-root"
            ) from exc
        return super().resolve_root(target)


register_dataset(DemoAdapter())
