"""Leaderboards: metrics averaged over categories, then mean and spread over seeds.

For one (dataset, method, variant, shot) and one seed, a metric is first averaged
over the categories where it is defined (NaN values are skipped, failed jobs are
absent). The leaderboard reports the mean and the sample standard deviation
(``ddof=1``) of those per-seed averages, with the numbers of seeds and categories
behind each value. ``leaderboard_by_category`` does the same without the category
average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from results.schema import (
    GROUP_COLUMNS,
    LEADERBOARD,
    LEADERBOARD_BY_CATEGORY,
    METRIC_NAMES,
    STATUS_FAILED,
    STATUS_OK,
)

GROUP_KEYS: tuple[str, ...] = tuple(column.name for column in GROUP_COLUMNS)


def shot_sort_key(shot: str) -> tuple[int, int]:
    """Order shots numerically with ``"full"`` last: 1, 4, 16, full."""
    return (1, 0) if shot == "full" else (0, int(shot))


def build_leaderboard(jobs: pd.DataFrame) -> pd.DataFrame:
    """Summarise a ``jobs`` table per dataset, method, variant and shot.

    Args:
        jobs: the ``jobs`` table (one row per job, failed ones included).

    Returns:
        A frame with the columns of the ``leaderboard`` schema, sorted by its key.
    """
    rows = []
    for key, group in _groups(jobs, GROUP_KEYS):
        row = dict(zip(GROUP_KEYS, key, strict=True))
        ok = group[group["status"] == STATUS_OK]
        for metric in METRIC_NAMES:
            row.update(_summarise_over_categories(ok, metric))
        row.update(_job_counts(group))
        rows.append(row)
    return _sorted(pd.DataFrame(rows, columns=LEADERBOARD.names), LEADERBOARD.key)


def build_leaderboard_by_category(jobs: pd.DataFrame) -> pd.DataFrame:
    """Summarise a ``jobs`` table per dataset, category, method, variant and shot."""
    keys = ("dataset", "category", *GROUP_KEYS[1:])
    rows = []
    for key, group in _groups(jobs, keys):
        row = dict(zip(keys, key, strict=True))
        ok = group[group["status"] == STATUS_OK]
        for metric in METRIC_NAMES:
            values = ok[metric].to_numpy(dtype=np.float64)
            mean, std, n_seeds = _mean_std(values)
            row[f"{metric}_mean"] = mean
            row[f"{metric}_std"] = std
            row[f"{metric}_n_seeds"] = n_seeds
        row.update(_job_counts(group))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=LEADERBOARD_BY_CATEGORY.names)
    return _sorted(frame, LEADERBOARD_BY_CATEGORY.key)


def _groups(jobs: pd.DataFrame, keys: Sequence[str]):
    if jobs.empty:
        return []
    return jobs.groupby(list(keys), sort=False, dropna=False)


def _summarise_over_categories(ok: pd.DataFrame, metric: str) -> dict[str, float | int]:
    """Average ``metric`` over categories per seed, then summarise over seeds."""
    defined = ok[np.isfinite(ok[metric].to_numpy(dtype=np.float64))]
    per_seed = defined.groupby("seed")[metric].mean()
    mean, std, n_seeds = _mean_std(per_seed.to_numpy(dtype=np.float64))
    return {
        f"{metric}_mean": mean,
        f"{metric}_std": std,
        f"{metric}_n_seeds": n_seeds,
        f"{metric}_n_categories": int(defined["category"].nunique()),
    }


def _mean_std(values: np.ndarray) -> tuple[float, float, int]:
    """Return mean, sample std (NaN below two values) and count of the finite ``values``."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan, 0
    std = float(np.std(finite, ddof=1)) if finite.size > 1 else math.nan
    return float(np.mean(finite)), std, int(finite.size)


def _job_counts(group: pd.DataFrame) -> dict[str, int]:
    return {
        "n_jobs_ok": int((group["status"] == STATUS_OK).sum()),
        "n_jobs_failed": int((group["status"] == STATUS_FAILED).sum()),
    }


def _sorted(frame: pd.DataFrame, key: Sequence[str]) -> pd.DataFrame:
    if frame.empty:
        return frame
    order = frame.assign(_shot_order=frame["shot"].map(shot_sort_key))
    columns = [name if name != "shot" else "_shot_order" for name in key]
    order = order.sort_values(columns, kind="stable")
    return order.drop(columns="_shot_order").reset_index(drop=True)
