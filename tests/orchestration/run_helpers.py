"""Helpers of the orchestration tests: CLI invocation and table comparison."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

# The reference run: demo, one category, tiny random backbone, two fitting steps.
BASE_ARGS = [
    "--dataset",
    "demo",
    "--categories",
    "checkered_tile",
    "--backbone",
    "tiny-test",
    "--pretrained",
    "none",
    "--steps",
    "2",
    "--log-level",
    "WARNING",
]
BASELINE_ARGS = [*BASE_ARGS, "--shots", "1,4", "--seeds", "0,1", "--methods", "h2vlr,patch-knn"]


@dataclass(frozen=True)
class RunResult:
    """Exit code, output and directory of one CLI run."""

    exit_code: int
    output: str
    run_dir: Path

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.run_dir / f"{name}.parquet")


def invoke_cli(command: str, args: list[str], out: Path, run_name: str) -> RunResult:
    """Run ``h2vlr-bench COMMAND ARGS`` in this process."""
    from typer.testing import CliRunner

    from orchestration.cli import app

    runner = CliRunner()
    result = runner.invoke(app, [command, *args, "--out", str(out), "--run-name", run_name])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return RunResult(result.exit_code, result.output, out / run_name)


def comparable(frame: pd.DataFrame, schema_name: str) -> pd.DataFrame:
    """Keep the columns that depend only on the job specs; sort rows by the table's key."""
    from results.schema import TABLES

    schema = TABLES[schema_name]
    selected = frame[schema.reproducible_names()].copy()
    for column in selected.columns:
        if selected[column].dtype == object:
            selected[column] = selected[column].map(
                lambda v: tuple(v) if hasattr(v, "__len__") and not isinstance(v, str) else v
            )
    return selected.sort_values(list(schema.key)).reset_index(drop=True)


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
