"""Time the H2VLR fit and its per-image scoring at ViT-B-16-plus-240 feature sizes.

The backbone is ``ViT-B-16-plus-240`` with random weights (no download): 15 x 15 patches,
embedding width 640, four feature layers. Support and query features are random
tensors of those sizes, so the figures cover H2VLR's own work: the fit (training views
encoded by the backbone, prompt learner, hypergraph construction and reasoning) and the
scoring of cached features. The backbone's own per-image encoding time is measured on
the same device to give the ratio of reasoning cost to backbone cost.

Usage:
    python bench/h2vlr_speed.py --device cpu --threads 1 --full-shot 200
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from h2vlr.backbone import load_backbone
from h2vlr.features import FeatureExtractor, Features
from h2vlr.methods import FitContext, QueryBatch, create_method

MODEL = "ViT-B-16-plus-240"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--steps", type=int, default=None, help="fit steps (default: config)")
    parser.add_argument("--full-shot", type=int, default=200, help="support images of full-shot")
    parser.add_argument("--queries", type=int, default=16, help="query images scored")
    parser.add_argument("--variant", default="full", help="H2VLR variant string")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_features(
    count: int, layers: int, grid: tuple[int, int], width: int, seed: int
) -> Features:
    generator = torch.Generator().manual_seed(seed)
    patches = grid[0] * grid[1]
    return Features(
        global_embeds=torch.randn(count, width, generator=generator),
        patch_tokens=torch.randn(count, layers, patches, width, generator=generator),
        grid_size=grid,
    )


def write_images(directory: Path, count: int, size: int) -> list[Path]:
    """Write ``count`` random RGB images (the fit loads them to make training views)."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = directory / f"support_{index:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def backbone_seconds_per_image(backbone, device: torch.device, batch: int = 8) -> float:
    pixels = torch.randn(batch, 3, backbone.image_size, backbone.image_size)
    backbone.encode_images(pixels)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(2):
        backbone.encode_images(pixels)
    synchronize(device)
    return (time.perf_counter() - start) / (2 * batch)


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA allocation, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backbone = load_backbone(MODEL, "none", device=args.device)
    extractor = FeatureExtractor(backbone, cache=None)
    grid, width, layers = backbone.grid_size, backbone.embed_dim, len(backbone.layers)
    options = {} if args.steps is None else {"steps": args.steps}

    per_image_backbone = backbone_seconds_per_image(backbone, device)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"device {device}, threads {torch.get_num_threads()}"
    )
    print(
        f"backbone {MODEL}: grid {grid}, width {width}, layers {layers}; "
        f"{per_image_backbone * 1000:.1f} ms per image"
    )

    queries = random_features(args.queries, layers, grid, width, seed=1)
    config = create_method("h2vlr", args.variant, options).config
    views_seconds = config.n_views * per_image_backbone
    print(
        f"variant {args.variant}, steps {config.steps}, n_views {config.n_views} "
        f"(encoding the views is about {views_seconds:.1f} s of each fit)"
    )
    print("| shot | support patches | fit s | scoring ms/image | scoring / backbone | peak MiB |")
    print("|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        all_paths = write_images(Path(tmp), args.full_shot, backbone.image_size)
        for shot in (1, 4, args.full_shot):
            method = create_method("h2vlr", args.variant, options)
            ctx = FitContext(
                backbone,
                extractor,
                "object",
                all_paths[:shot],
                random_features(shot, layers, grid, width, seed=0),
                seed=0,
                device=device,
            )
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            stats = method.fit(ctx)
            synchronize(device)
            fit_seconds = time.perf_counter() - start

            start = time.perf_counter()
            method.score(QueryBatch(all_paths[: args.queries], queries))
            synchronize(device)
            score_seconds = (time.perf_counter() - start) / args.queries
            ratio = score_seconds / per_image_backbone
            print(
                f"| {shot} | {int(stats['support_patches'])} | {fit_seconds:.1f} | "
                f"{score_seconds * 1000:.1f} | {ratio:.2f} | {peak_memory_mib(device):.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
