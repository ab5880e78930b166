"""Measure feature extraction speed and the cost of a feature cache hit on the CPU.

For each backbone (random weights, so no download is needed) the script times:
cold extraction (decode, preprocess, forward, cache write), warm extraction (every
image a cache hit) and the bare forward pass on preprocessed pixels. Images are
random 256 x 256 PNG files in a temporary directory.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/backbone_speed.py --output /tmp/bench_backbone.md
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from h2vlr.backbone import load_backbone
from h2vlr.features import FeatureCache, FeatureExtractor
from h2vlr.paths import _file_sha256


@dataclass(frozen=True)
class SpeedResult:
    """Timings of one backbone."""

    backbone: str
    image_size: int  # S
    images: int  # images per timed pass
    load_s: float  # building the model
    cold_images_per_s: float  # extraction with an empty cache
    warm_images_per_s: float  # extraction with every image cached
    forward_images_per_s: float  # encode_images on preprocessed pixels only
    entry_bytes: int  # size of one cache entry


def _write_images(directory: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = directory / f"image_{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def measure(name: str, paths: list[Path], cache_dir: Path, batch_size: int) -> SpeedResult:
    """Time cold extraction, warm extraction and the bare forward of one backbone."""
    load_s, backbone = _timed(lambda: load_backbone(name, "none", device="cpu"))
    cache = FeatureCache(cache_dir / name)

    cold_s, _ = _timed(lambda: FeatureExtractor(backbone, cache, batch_size).extract(paths))
    # A new process hashes every image file again; drop the in-process digest memo so the
    # warm pass pays for hashing too.
    _file_sha256.cache_clear()
    warm_extractor = FeatureExtractor(backbone, cache, batch_size)
    warm_s, _ = _timed(lambda: warm_extractor.extract(paths))
    if warm_extractor.stats.encoded != 0:
        raise RuntimeError(
            f"warm pass of {name} encoded {warm_extractor.stats.encoded} images; "
            f"expected 0 because every image was cached by the cold pass"
        )

    pixels = torch.stack([backbone.preprocess_image(Image.open(p)) for p in paths])
    forward_s = sum(
        _timed(lambda batch=batch: backbone.encode_images(batch))[0]
        for batch in pixels.split(batch_size)
    )
    entry_bytes = next(cache.root.glob("*/*/*.safetensors")).stat().st_size
    count = len(paths)
    return SpeedResult(
        backbone=name,
        image_size=backbone.image_size,
        images=count,
        load_s=load_s,
        cold_images_per_s=count / cold_s,
        warm_images_per_s=count / warm_s,
        forward_images_per_s=count / forward_s,
        entry_bytes=entry_bytes,
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description(threads: int) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{_cpu_model()}, {os.cpu_count()} logical cores visible, torch {torch.__version__} "
        f"with {threads} intra-op thread(s), open_clip {open_clip.__version__}, "
        f"Python {platform.python_version()}; load average at start {load}"
    )


def render_markdown(results: list[SpeedResult], machine: str, batch_size: int) -> str:
    lines = [
        "## Backbone feature extraction (CPU)",
        "",
        f"Machine: {machine}.",
        "",
        "Script: `OMP_NUM_THREADS=1 .venv/bin/python bench/backbone_speed.py` (random weights, "
        f"random 256 x 256 PNG images, batch size {batch_size}, one pass each).",
        "Cold: empty cache (decode, preprocess, forward, float16 write). Warm: every image a "
        "cache hit (file hash, entry read). Forward: `encode_images` on preprocessed pixels.",
        "",
        "| Backbone | S | Images | Load (s) | Cold (images/s) | Warm (images/s) "
        "| Forward (images/s) | Warm / forward | Entry size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r.warm_images_per_s / r.forward_images_per_s
        lines.append(
            f"| {r.backbone} | {r.image_size} | {r.images} | {r.load_s:.1f} "
            f"| {r.cold_images_per_s:.1f} | {r.warm_images_per_s:.1f} "
            f"| {r.forward_images_per_s:.1f} | {ratio:.0f}x | {r.entry_bytes / 1024:.0f} KiB |"
        )
    lines.append("")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-images", type=int, default=64, help="images for tiny-test")
    parser.add_argument("--vit-images", type=int, default=8, help="images for ViT-B-16-plus-240")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--output", type=Path, default=None, help="markdown file to write")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_description(args.threads)
    plan = [("tiny-test", args.tiny_images), ("ViT-B-16-plus-240", args.vit_images)]

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        paths = _write_images(root, max(count for _, count in plan))
        for name, count in plan:
            results.append(measure(name, paths[:count], root / "cache", args.batch_size))

    report = render_markdown(results, machine, args.batch_size)
    print(report)
    if args.output is not None:
        args.output.write_text(report)


if __name__ == "__main__":
    main()
