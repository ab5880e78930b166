"""Rows of the jobs table for the results tests, built field by field."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from results.schema import METRIC_NAMES

STARTED = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def job_row(
    category: str = "tile",
    seed: int = 0,
    method: str = "patch-knn",
    variant: str = "full",
    shot: str = "1",
    status: str = "ok",
    metrics: dict[str, float] | None = None,
    pretrained: str = "none",
) -> dict:
    """Return one valid jobs row; metrics not given are NaN with a reason."""
    metrics = metrics or {}
    row = {
        "job_id": f"demo_{category}_{shot}shot_seed{seed}_{method}_{variant}_{pretrained}",
        "dataset": "demo",
        "category": category,
        "shot": shot,
        "seed": seed,
        "method": method,
        "variant": variant,
        "backbone": "tiny-test",
        "pretrained": pretrained,
        "random_weights": pretrained == "none",
        "image_size": 64,
        "n_support": int(shot) if shot != "full" else 16,
        "status": status,
        "error": "" if status == "ok" else "ValueError: bad",
        "traceback": "",
        "n_test": 20,
        "n_test_anomalous": 10,
        "pixel_images_excluded": 0,
        "support_files": [f"{category}/train/good/000.png"],
        "options": "{}",
        "fit_stats": "{}",
        "config_hash": "0" * 64,
        "images_encoded": 0,
        "feature_cache_hits": 21,
        "fit_seconds": 0.5,
        "score_seconds": 0.25,
        "images_per_second": 80.0,
        "host": "node-1",
        "device": "cpu",
        "versions": "{}",
        "started_at": STARTED,
        "finished_at": STARTED,
    }
    for name in METRIC_NAMES:
        value = metrics.get(name, math.nan) if status == "ok" else math.nan
        row[name] = value
        row[f"{name}_reason"] = "" if not math.isnan(value) else "not computed in this test"
    return row
