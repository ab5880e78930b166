"""``h2vlr-bench datasets``: list the dataset adapters and check a dataset tree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from h2vlr.data import DatasetReport, get_dataset, list_datasets
from h2vlr.registry import UnknownNameError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)

# Exit status of `check` when the dataset cannot be used (typer uses 2 for usage errors).
EXIT_UNUSABLE = 1


@app.command("list")
def list_command() -> None:
    """List the registered dataset adapters with their descriptions."""
    table = Table(title="Dataset adapters")
    table.add_column("Name", style="bold", no_wrap=True)
    table.add_column("Description")
    for name in list_datasets():
        table.add_row(name, escape(get_dataset(name).description))
    Console().print(table)


@app.command("check")
def check_command(
    dataset: Annotated[str, typer.Option("--dataset", help="Registered dataset name, e.g. mvtec.")],
    data_root: Annotated[
        Path | None,
        typer.Option(
            "--data-root",
            help="Directory that contains the dataset; optional for demo (cache directory).",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of tables.")
    ] = False,
) -> None:
    """Count support pool, test images, masks and defect types per category; list problems.

    Exits with status 1 when the dataset cannot be used (missing root, no categories,
    a category without normal or anomalous images, unreadable files).
    """
    try:
        adapter = get_dataset(dataset)
    except UnknownNameError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset") from exc

    report = adapter.check(data_root)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report)
    if not report.usable:
        raise typer.Exit(code=EXIT_UNUSABLE)


def _print_report(report: DatasetReport) -> None:
    console = Console()
    table = Table(title=f"{report.dataset} at {report.root}")
    table.add_column("Category", no_wrap=True)
    for column in ("Support pool", "Test normal", "Test anomalous", "Masks"):
        table.add_column(column, justify="right")
    table.add_column("Defect types")
    for name, counts in report.categories.items():
        table.add_row(
            escape(name),
            str(counts.support_pool),
            str(counts.test_normal),
            str(counts.test_anomalous),
            str(counts.masks),
            ", ".join(counts.defect_types),
        )
    console.print(table)

    if report.problems:
        count = len(report.problems)
        problems = Table(title=f"{count} problem{'' if count == 1 else 's'}")
        problems.add_column("Severity")
        problems.add_column("File")
        problems.add_column("Problem")
        for problem in report.problems:
            style = "red" if problem.severity == "error" else "yellow"
            problems.add_row(
                f"[{style}]{problem.severity}[/]", escape(problem.path), escape(problem.message)
            )
        console.print(problems)

    verdict = "usable" if report.usable else "[red]not usable[/]"
    console.print(f"Dataset {report.dataset}: {verdict}")
