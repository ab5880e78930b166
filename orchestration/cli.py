"""Command-line entry point: ``h2vlr-bench``.

The root app only mounts the command groups; each lives in its own module.
"""

from __future__ import annotations

import typer

from orchestration.cli_cache import app as cache_app
from orchestration.cli_datasets import app as datasets_app
from orchestration.cli_run import register_run_commands

app = typer.Typer(
    name="h2vlr-bench",
    help="Batch benchmarking of few-shot image anomaly detection (H2VLR and CLIP baselines).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(datasets_app, name="datasets", help="List dataset adapters and check a dataset.")
app.add_typer(cache_app, name="cache", help="Inspect or clear the feature cache.")
register_run_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
