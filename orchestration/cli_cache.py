"""``h2vlr-bench cache``: inspect or clear the feature cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from h2vlr.features import BackboneUsage, FeatureCache
from h2vlr.paths import default_cache_dir

app = typer.Typer(no_args_is_help=True, help="Inspect or clear the feature cache.")

CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Cache directory; default $H2VLR_CACHE_DIR or ~/.cache/h2vlr-bench.",
        file_okay=False,
    ),
]


def _open_cache(cache_dir: Path | None) -> FeatureCache:
    return FeatureCache(cache_dir if cache_dir is not None else default_cache_dir())


def _format_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _usage_table(rows: list[BackboneUsage], root: Path) -> Table:
    table = Table(title=f"Feature cache: {root}")
    table.add_column("Backbone")
    table.add_column("Weights", overflow="fold")
    table.add_column("Entries", justify="right")
    table.add_column("Size", justify="right")
    for row in rows:
        table.add_row(row.model_name, row.weights, str(row.entries), _format_bytes(row.bytes))
    entries = sum(row.entries for row in rows)
    size = sum(row.bytes for row in rows)
    table.add_section()
    table.add_row("total", "", str(entries), _format_bytes(size))
    return table


@app.command("info")
def info(
    cache_dir: CacheDirOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON object instead of a table.")
    ] = False,
) -> None:
    """Show cached entries and bytes per backbone."""
    cache = _open_cache(cache_dir)
    rows = cache.usage()
    if as_json:
        summary = {
            "cache_dir": str(cache.cache_dir),
            "features_dir": str(cache.root),
            "entries": sum(row.entries for row in rows),
            "bytes": sum(row.bytes for row in rows),
            "backbones": [dataclasses.asdict(row) for row in rows],
        }
        typer.echo(json.dumps(summary, indent=2))
        return
    Console().print(_usage_table(rows, cache.root))


@app.command("clear")
def clear(
    cache_dir: CacheDirOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
) -> None:
    """Delete every cached feature entry."""
    cache = _open_cache(cache_dir)
    rows = cache.usage()
    entries = sum(row.entries for row in rows)
    if not rows:
        typer.echo(f"Feature cache {cache.root} is empty; nothing to delete.")
        return

    size = _format_bytes(sum(row.bytes for row in rows))
    if not yes:
        typer.confirm(f"Delete {entries} entries ({size}) under {cache.root}?", abort=True)
    removed = cache.clear()
    typer.echo(
        f"Deleted {removed.entries} entries ({_format_bytes(removed.bytes)}) from {cache.root}."
    )
