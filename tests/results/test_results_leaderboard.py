"""Leaderboard and ablation aggregation on hand-made jobs tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from results_rows import job_row

from results.ablation import build_ablation
from results.leaderboard import build_leaderboard, build_leaderboard_by_category, shot_sort_key
from results.schema import ABLATION, LEADERBOARD, LEADERBOARD_BY_CATEGORY


def jobs_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def test_shot_order_numeric_then_full():
    assert sorted(["full", "16", "4", "1"], key=shot_sort_key) == ["1", "4", "16", "full"]


def test_leaderboard_averages_categories_then_seeds():
    # Seed 0: categories a=0.6, b=0.8 -> 0.7. Seed 1: a=0.9, b=0.7 -> 0.8.
    rows = [
        job_row("a", 0, metrics={"image_auroc": 0.6}),
        job_row("b", 0, metrics={"image_auroc": 0.8}),
        job_row("a", 1, metrics={"image_auroc": 0.9}),
        job_row("b", 1, metrics={"image_auroc": 0.7}),
    ]
    board = build_leaderboard(jobs_frame(rows))

    assert list(board.columns) == LEADERBOARD.names
    assert len(board) == 1
    row = board.iloc[0]
    assert row["image_auroc_mean"] == pytest.approx(0.75)
    assert row["image_auroc_std"] == pytest.approx(np.std([0.7, 0.8], ddof=1))
    assert row["image_auroc_n_seeds"] == 2
    assert row["image_auroc_n_categories"] == 2
    assert math.isnan(row["pixel_auroc_mean"])
    assert row["pixel_auroc_n_seeds"] == 0
    assert row["n_jobs_ok"] == 4


def test_leaderboard_skips_nan_and_failed_jobs():
    # Seed 0: a=0.6, b undefined -> 0.6. Seed 1: a failed, b=0.8 -> 0.8.
    rows = [
        job_row("a", 0, metrics={"image_auroc": 0.6}),
        job_row("b", 0, metrics={"image_auroc": math.nan}),
        job_row("a", 1, status="failed"),
        job_row("b", 1, metrics={"image_auroc": 0.8}),
    ]
    row = build_leaderboard(jobs_frame(rows)).iloc[0]

    assert row["image_auroc_mean"] == pytest.approx(0.7)
    assert row["image_auroc_n_categories"] == 2
    assert row["n_jobs_ok"] == 3
    assert row["n_jobs_failed"] == 1


def test_leaderboard_single_seed_std_nan():
    row = build_leaderboard(jobs_frame([job_row(metrics={"image_auroc": 0.9})])).iloc[0]
    assert row["image_auroc_mean"] == pytest.approx(0.9)
    assert math.isnan(row["image_auroc_std"])


def test_leaderboard_rows_sorted_by_shot():
    rows = [job_row(shot=shot, metrics={"image_auroc": 0.5}) for shot in ("full", "4", "1")]
    board = build_leaderboard(jobs_frame(rows))
    assert board["shot"].tolist() == ["1", "4", "full"]
    LEADERBOARD.table_from_frame(board)  # matches the schema


def test_leaderboard_by_category_per_category():
    rows = [
        job_row("a", 0, metrics={"image_auroc": 0.6}),
        job_row("a", 1, metrics={"image_auroc": 0.8}),
        job_row("b", 0, metrics={"image_auroc": 0.5}),
    ]
    frame = build_leaderboard_by_category(jobs_frame(rows))
    board = frame.set_index("category")

    assert list(frame.columns) == LEADERBOARD_BY_CATEGORY.names
    assert board.at["a", "image_auroc_mean"] == pytest.approx(0.7)
    assert board.at["a", "image_auroc_n_seeds"] == 2
    assert board.at["b", "image_auroc_mean"] == pytest.approx(0.5)
    assert math.isnan(board.at["b", "image_auroc_std"])


def test_ablation_deltas_against_full():
    rows = [
        job_row(method="h2vlr", variant="full", metrics={"image_auroc": 0.8}),
        job_row(method="h2vlr", variant="no-hsr", metrics={"image_auroc": 0.7}),
        job_row(method="h2vlr", variant="no-dsi", metrics={"image_auroc": 0.85}),
        job_row(method="patch-knn", metrics={"image_auroc": 0.9}),
    ]
    ablation = build_ablation(build_leaderboard(jobs_frame(rows)))

    assert list(ablation.columns) == ABLATION.names
    assert ablation["variant"].tolist() == ["full", "no-dsi", "no-hsr"]
    deltas = dict(zip(ablation["variant"], ablation["image_auroc_delta"], strict=True))
    assert deltas["full"] == pytest.approx(0.0)
    assert deltas["no-dsi"] == pytest.approx(0.05)
    assert deltas["no-hsr"] == pytest.approx(-0.1)
    ABLATION.table_from_frame(ablation)


def test_ablation_without_full_gives_nan_delta():
    rows = [job_row(method="h2vlr", variant="no-hsr", metrics={"image_auroc": 0.7})]
    ablation = build_ablation(build_leaderboard(jobs_frame(rows)))
    assert math.isnan(ablation.iloc[0]["image_auroc_delta"])


def test_random_weights_reach_every_summary():
    rows = [
        job_row(seed=0, variant=variant, method="h2vlr", pretrained=weights, metrics=metrics)
        for weights, scale in (("none", 0.5), ("laion400m_e32", 1.0))
        for variant, metrics in (
            ("full", {"image_auroc": 0.8 * scale}),
            ("no-hsr", {"image_auroc": 0.6 * scale}),
        )
    ]
    by_category = build_leaderboard_by_category(jobs_frame(rows))
    pairs = zip(by_category["pretrained"], by_category["random_weights"], strict=True)
    assert sorted(pairs) == [
        ("laion400m_e32", False),
        ("laion400m_e32", False),
        ("none", True),
        ("none", True),
    ]

    # With two leaderboards that differ by weights only, each variant is compared to
    # the "full" run of its own weights.
    for weights, scale in (("none", 0.5), ("laion400m_e32", 1.0)):
        board = build_leaderboard(jobs_frame([r for r in rows if r["pretrained"] == weights]))
        assert board["random_weights"].tolist() == [weights == "none"] * 2
        ablation = build_ablation(board)
        assert list(ablation.columns) == ABLATION.names
        assert ablation["backbone"].tolist() == ["tiny-test"] * 2
        assert ablation["pretrained"].tolist() == [weights] * 2
        assert ablation["random_weights"].tolist() == [weights == "none"] * 2
        assert ablation["image_auroc_delta"].tolist() == pytest.approx([0.0, -0.2 * scale])


def test_ablation_compares_within_the_same_weights():
    rows = [
        job_row(variant="full", method="h2vlr", pretrained="none", metrics={"image_auroc": 0.5}),
        job_row(variant="no-hsr", method="h2vlr", pretrained="laion", metrics={"image_auroc": 0.9}),
    ]
    board = build_leaderboard(jobs_frame(rows))
    ablation = build_ablation(board).set_index("variant")
    assert ablation.at["full", "image_auroc_delta"] == 0.0
    # No "full" run with the same weights: the delta is undefined, not 0.9 - 0.5.
    assert math.isnan(ablation.at["no-hsr", "image_auroc_delta"])
