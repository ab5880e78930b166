"""Time the baselines (and h2vlr when available) on the same cached features.

For one backbone (random weights, so no download is needed) and one demo category, the
script extracts the features of the support and test images once, then for each method
times ``fit`` and two ``score`` passes over the test images. The first pass includes
the cached per-image extras that a method computes itself (WinCLIP window embeddings).
The second reads everything from the cache: it is the per-image scoring cost of a run
once the features exist. Timings are wall-clock seconds from ``time.perf_counter``.

Usage:
    python bench/baselines_speed.py --model tiny-test --images 8 --shot 2
    python bench/baselines_speed.py --model ViT-B-16-plus-240 --images 2 --shot 1

Prints one markdown table per backbone, headed by the machine and settings.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Runs from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from h2vlr.backbone import load_backbone  # noqa: E402
from h2vlr.data import get_dataset, sample_support  # noqa: E402
from h2vlr.features import FeatureCache, FeatureExtractor  # noqa: E402
from h2vlr.methods import FitContext, QueryBatch, create_method, list_methods  # noqa: E402

BASELINES = ("clip-zeroshot", "winclip", "winclip-plus", "patch-knn")
CATEGORY = "checkered_tile"


@dataclass
class Timing:
    """Seconds spent by one method; per-image values divide by the test image count."""

    method: str
    variant: str
    fit_s: float
    first_score_per_image_s: float  # includes computing uncached extras (window embeddings)
    score_per_image_s: float  # everything read from the cache
    note: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-test", help="open_clip model name or tiny-test")
    parser.add_argument("--images", type=int, default=8, help="test images scored per pass")
    parser.add_argument("--shot", type=int, default=2, help="support images per fit")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--h2vlr-variant",
        default="full+steps=10",
        help="variant string of h2vlr (fewer fit steps keep the run short; scoring "
        "cost does not depend on the step count)",
    )
    parser.add_argument("--skip-h2vlr", action="store_true", help="time the baselines only")
    return parser.parse_args(argv)


def cpu_name() -> str:
    """Return the CPU model from /proc/cpuinfo (Linux), else what ``platform`` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(args: argparse.Namespace, backbone) -> str:
    """Describe the hardware and software the numbers come from."""
    device = str(backbone.device)
    if backbone.device.type == "cuda":
        device = f"{device} ({torch.cuda.get_device_name(backbone.device)})"
    return (
        f"{cpu_name()}, {os.cpu_count()} logical CPUs "
        f"visible, torch {torch.__version__} with {torch.get_num_threads()} intra-op thread(s), "
        f"device {device}; backbone {args.model} (random weights), image size "
        f"{backbone.image_size}, grid {backbone.grid_size[0]}x{backbone.grid_size[1]}, "
        f"{len(backbone.identity.layers)} feature layers; {args.images} test images, "
        f"{args.shot}-shot support"
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(name, variant, backbone, extractor, class_name, support, test) -> Timing:
    """Fit once, score twice; return the timings of one method."""
    method = create_method(name, variant)
    support_features = extractor.extract(support)
    test_features = extractor.extract(test)
    ctx = FitContext(backbone, extractor, class_name, support, support_features, seed=0)
    ctx.device = backbone.device

    start = time.perf_counter()
    method.fit(ctx)
    _synchronize(backbone.device)
    fit_s = time.perf_counter() - start

    passes = []
    for _ in range(2):
        start = time.perf_counter()
        method.score(QueryBatch(list(test), test_features))
        _synchronize(backbone.device)
        passes.append((time.perf_counter() - start) / len(test))
    return Timing(name, variant, fit_s, passes[0], passes[1])


def run(args: argparse.Namespace) -> str:
    """Time every method on one backbone; return the markdown section."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="h2vlr-bench-") as tmp:
        return _run_in(args, Path(tmp))


def _run_in(args: argparse.Namespace, workdir: Path) -> str:
    backbone = load_backbone(args.model, "none", device=args.device)
    data = get_dataset("demo").load_category(workdir / "demo", CATEGORY)
    support = [sample.path for sample in sample_support(data, args.shot, seed=0)]
    test = [sample.path for sample in data.test[: args.images]]
    extractor = FeatureExtractor(backbone, FeatureCache(workdir / "features"))

    start = time.perf_counter()
    extractor.extract(support + test)
    _synchronize(backbone.device)
    extract_per_image = (time.perf_counter() - start) / (len(support) + len(test))

    methods = [(name, "full") for name in BASELINES]
    if not args.skip_h2vlr and "h2vlr" in list_methods():
        methods.append(("h2vlr", args.h2vlr_variant))

    timings = []
    for name, variant in methods:
        try:
            timings.append(
                time_method(name, variant, backbone, extractor, data.class_name, support, test)
            )
        except Exception as exc:  # a method still under construction must not hide the others
            timings.append(
                Timing(name, variant, float("nan"), float("nan"), float("nan"), repr(exc))
            )

    return format_section(args, backbone, extract_per_image, timings, extractor.stats.as_dict())


def format_section(args, backbone, extract_per_image, timings, stats) -> str:
    lines = [
        f"### {args.model}",
        "",
        f"Machine: {machine_line(args, backbone)}.",
        "",
        f"Feature extraction (global embedding and patch tokens): {extract_per_image * 1000:.2f} "
        "ms per image.",
        "",
        "| method | variant | fit (s) | first score (ms/image) | cached score (ms/image) | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for t in timings:
        lines.append(
            f"| {t.method} | {t.variant} | {t.fit_s:.3f} | {t.first_score_per_image_s * 1000:.2f} "
            f"| {t.score_per_image_s * 1000:.2f} | {t.note} |"
        )
    lines += ["", f"Extractor counters: {stats}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    print(run(parse_args(argv)))


if __name__ == "__main__":
    main()
