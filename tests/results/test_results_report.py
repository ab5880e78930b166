"""The random-weights note of the Rich summary and the leaderboard plot."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from results_rows import job_row
from rich.console import Console

from results.leaderboard import build_leaderboard
from results.report import RANDOM_WEIGHTS_NOTE, leaderboard_figure, print_summary

COUNTS = {"total": 2, "ok": 2, "failed": 0, "skipped": 0}


def board(pretrained: str) -> pd.DataFrame:
    rows = [
        job_row(seed=seed, pretrained=pretrained, metrics={"image_auroc": 0.6 + seed / 10})
        for seed in (0, 1)
    ]
    return build_leaderboard(pd.DataFrame(rows))


def summary_text(leaderboard: pd.DataFrame) -> str:
    console = Console(record=True, width=200)
    print_summary(console, leaderboard, COUNTS)
    return console.export_text()


@pytest.mark.parametrize(("pretrained", "noted"), [("none", True), ("laion400m_e32", False)])
def test_summary_notes_random_weights(pretrained, noted):
    text = summary_text(board(pretrained))
    assert (RANDOM_WEIGHTS_NOTE in text) is noted
    assert "patch-knn" in text


@pytest.mark.parametrize(("pretrained", "noted"), [("none", True), ("laion400m_e32", False)])
def test_figure_notes_random_weights(pretrained, noted):
    fig = leaderboard_figure(board(pretrained))
    try:
        title = fig.get_suptitle()
    finally:
        plt.close(fig)
    assert (title == RANDOM_WEIGHTS_NOTE) is noted
    assert noted or title == ""
