"""A short Rich summary of a run and a PNG plot of its leaderboard."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from results.leaderboard import shot_sort_key  # noqa: E402

SUMMARY_METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "pixel_aupro")
RANDOM_WEIGHTS_NOTE = "random weights (--pretrained none): not benchmark results"


def uses_random_weights(leaderboard: pd.DataFrame) -> bool:
    """Return True when any row of ``leaderboard`` comes from a randomly initialised backbone."""
    return bool(leaderboard["random_weights"].any()) if len(leaderboard) else False


def format_mean_std(mean: float, std: float) -> str:
    """Format a metric as a percentage, ``"87.3 ± 1.2"``; ``"-"`` when undefined."""
    if math.isnan(mean):
        return "-"
    if math.isnan(std):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def leaderboard_table(leaderboard: pd.DataFrame, title: str = "Leaderboard") -> Table:
    """Build a Rich table of the leaderboard's main metrics, in percent.

    When any row used random weights, the title carries ``RANDOM_WEIGHTS_NOTE``.
    """
    if uses_random_weights(leaderboard):
        title = f"{title} [bold red]({RANDOM_WEIGHTS_NOTE})[/]"
    table = Table(title=title)
    for name in ("dataset", "method", "shot"):
        table.add_column(name, no_wrap=True)
    for header in ("image AUROC %", "pixel AUROC %", "AUPRO %"):
        table.add_column(header, justify="right")
    table.add_column("seeds", justify="right")
    table.add_column("failed", justify="right")
    for _, row in leaderboard.iterrows():
        cells = [str(row["dataset"]), method_label(row["method"], row["variant"]), str(row["shot"])]
        cells += [format_mean_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in SUMMARY_METRICS]
        cells += [str(row["image_auroc_n_seeds"]), str(row["n_jobs_failed"])]
        table.add_row(*cells)
    return table


def method_label(method: str, variant: str) -> str:
    """Return ``method`` for the full variant, else ``method/variant``."""
    return method if variant == "full" else f"{method}/{variant}"


def print_summary(console: Console, leaderboard: pd.DataFrame, counts: dict[str, int]) -> None:
    """Print the job counts and the leaderboard."""
    console.print(
        f"jobs: {counts['total']} total, {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['skipped']} skipped (already done)"
    )
    console.print(leaderboard_table(leaderboard))


def plot_leaderboard(leaderboard: pd.DataFrame, path: Path, metric: str = "image_auroc") -> Path:
    """Write the figure of :func:`leaderboard_figure` to ``path`` as a PNG."""
    fig = leaderboard_figure(leaderboard, metric)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def leaderboard_figure(leaderboard: pd.DataFrame, metric: str = "image_auroc") -> plt.Figure:
    """Plot ``metric`` per method and shot as grouped bars with ±1 std error bars.

    One panel per dataset; one bar group per shot; one bar per method and variant.
    When any row used random weights, ``RANDOM_WEIGHTS_NOTE`` in red is the figure title.
    """
    datasets = sorted(leaderboard["dataset"].unique())
    fig, axes = plt.subplots(
        1, max(len(datasets), 1), figsize=(5 * max(len(datasets), 1), 4), squeeze=False
    )
    for ax, dataset in zip(axes[0], datasets, strict=False):
        _plot_dataset(ax, leaderboard[leaderboard["dataset"] == dataset], metric)
        ax.set_title(dataset)
    if uses_random_weights(leaderboard):
        fig.suptitle(RANDOM_WEIGHTS_NOTE, color="red", fontweight="bold", wrap=True)
    fig.tight_layout()
    return fig


def _plot_dataset(ax: plt.Axes, rows: pd.DataFrame, metric: str) -> None:
    shots = sorted(rows["shot"].unique(), key=shot_sort_key)
    pairs = sorted(set(zip(rows["method"], rows["variant"], strict=True)))
    width = 0.8 / max(len(pairs), 1)
    for index, (method, variant) in enumerate(pairs):
        selected = rows[(rows["method"] == method) & (rows["variant"] == variant)]
        # One bar per shot; should several backbones share a label, the first row is drawn.
        by_shot = selected.drop_duplicates("shot").set_index("shot")
        means = [float(by_shot[f"{metric}_mean"].get(shot, math.nan)) for shot in shots]
        stds = [float(by_shot[f"{metric}_std"].get(shot, math.nan)) for shot in shots]
        stds = [0.0 if math.isnan(s) else s for s in stds]
        positions = [i + (index - (len(pairs) - 1) / 2) * width for i in range(len(shots))]
        label = method_label(method, variant)
        ax.bar(positions, means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(range(len(shots)), [f"{s}-shot" for s in shots])
    ax.set_ylabel(metric)
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize="small")
