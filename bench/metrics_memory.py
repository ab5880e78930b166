"""Measure peak memory and time of the pixel metrics at benchmark scale.

Builds random float32 anomaly maps and bool masks (rectangles in a share of the images,
scores raised inside them) for ``--images`` test images of ``--size`` x ``--size`` pixels,
then runs ``h2vlr.metrics.evaluate`` on them once. It prints the resident set size before
the metrics, the process peak RSS (``resource.getrusage``), the peak of numpy allocations
during the metrics alone (``tracemalloc``) and the wall time.

Usage:
    OMP_NUM_THREADS=1 python bench/metrics_memory.py --images 2000 --size 240
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc

import numpy as np

from h2vlr.metrics import evaluate

GIB = 1024**3


def make_inputs(
    n_images: int, size: int, anomalous_share: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return labels ``[B]``, scores ``[B]``, masks ``bool [B, S, S]`` and maps ``float32 [B, S, S]``."""
    rng = np.random.default_rng(seed)
    maps = rng.random((n_images, size, size), dtype=np.float32)
    masks = np.zeros((n_images, size, size), dtype=bool)
    labels = (rng.random(n_images) < anomalous_share).astype(np.int64)
    for index in np.flatnonzero(labels):
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, size - 8, size=2)
            h, w = rng.integers(4, size // 4, size=2)
            masks[index, y : y + h, x : x + w] = True
        maps[index][masks[index]] += np.float32(0.3)
    scores = maps.reshape(n_images, -1).max(axis=1).astype(np.float64)
    return labels, scores, masks, maps


def current_rss_bytes() -> int:
    """Return the resident set size of this process from /proc (Linux only)."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * resource.getpagesize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="number of test images B")
    parser.add_argument("--size", type=int, default=240, help="evaluation resolution S in pixels")
    parser.add_argument(
        "--anomalous-share", type=float, default=0.5, help="share of images with a mask"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = parser.parse_args(argv)

    labels, scores, masks, maps = make_inputs(
        args.images, args.size, args.anomalous_share, args.seed
    )
    input_bytes = masks.nbytes + maps.nbytes
    rss_before = current_rss_bytes()

    tracemalloc.start()
    start = time.perf_counter()
    result = evaluate(labels, scores, masks, maps)
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # ru_maxrss is in KiB on Linux.
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print(f"pixels: {masks.size:,} ({args.images} images of {args.size}x{args.size})")
    print(f"anomalous pixels: {int(masks.sum()):,}")
    print(f"inputs (masks + maps): {input_bytes / GIB:.2f} GiB")
    print(f"RSS before metrics: {rss_before / GIB:.2f} GiB")
    print(f"peak RSS of the process: {peak_rss / GIB:.2f} GiB")
    print(f"peak traced allocations during evaluate: {traced_peak / GIB:.2f} GiB")
    print(f"evaluate wall time: {seconds:.1f} s")
    for name, value in result.values.items():
        print(f"  {name}: {value:.4f}")
    if peak_rss >= 4 * GIB:
        sys.exit("peak RSS is 4 GiB or more; the pixel metrics exceed their memory budget")


if __name__ == "__main__":
    main()
