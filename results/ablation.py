"""The ablation table: one row per variant and shot, with each metric's change to ``full``."""

from __future__ import annotations

import pandas as pd

from results.leaderboard import shot_sort_key
from results.schema import ABLATION, BACKBONE_NAMES, METRIC_NAMES

REFERENCE_VARIANT = "full"
# A variant is compared to the "full" run of the same dataset, shot and backbone.
MATCH_KEYS: tuple[str, ...] = ("dataset", "shot", *BACKBONE_NAMES)


def build_ablation(leaderboard: pd.DataFrame, method: str = "h2vlr") -> pd.DataFrame:
    """Compare every variant of ``method`` to its ``full`` variant.

    Args:
        leaderboard: the ``leaderboard`` table.
        method: the ablated method.

    Returns:
        A frame with the columns of the ``ablation`` schema. ``<metric>_delta`` is
        the variant's mean minus the mean of ``full`` at the same dataset, shot,
        backbone, weights and image size (0 for ``full`` itself, NaN when that
        ``full`` run is not in the leaderboard).
    """
    rows = leaderboard[leaderboard["method"] == method]
    reference = rows[rows["variant"] == REFERENCE_VARIANT].set_index(list(MATCH_KEYS))
    records = []
    for _, row in rows.iterrows():
        names = ("dataset", "method", "variant", "shot", *BACKBONE_NAMES)
        record = {name: row[name] for name in names}
        for metric in METRIC_NAMES:
            mean = float(row[f"{metric}_mean"])
            record[f"{metric}_mean"] = mean
            record[f"{metric}_std"] = float(row[f"{metric}_std"])
            key = tuple(row[name] for name in MATCH_KEYS)
            base = (
                float(reference.at[key, f"{metric}_mean"])
                if key in reference.index
                else float("nan")
            )
            record[f"{metric}_delta"] = mean - base
        record["n_jobs_ok"] = int(row["n_jobs_ok"])
        record["n_jobs_failed"] = int(row["n_jobs_failed"])
        records.append(record)
    frame = pd.DataFrame(records, columns=ABLATION.names)
    if frame.empty:
        return frame
    frame["_order"] = [
        (dataset, shot_sort_key(shot), variant != REFERENCE_VARIANT, variant)
        for dataset, shot, variant in zip(
            frame["dataset"], frame["shot"], frame["variant"], strict=True
        )
    ]
    return frame.sort_values("_order").drop(columns="_order").reset_index(drop=True)
