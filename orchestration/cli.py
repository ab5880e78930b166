"""Command-line entry point: ``h2vlr-bench``.

The root app only mounts the command groups; each lives in its own module.
"""

from __future__ import annotations

import warnings

# open_clip still decorates a few helpers with torch.jit.script, which torch 2.14
# reports as deprecated on every start; the warning is noise to a benchmark user.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

import typer  # noqa: E402

from orchestration.cli_cache import app as cache_app  # noqa: E402
from orchestration.cli_datasets import app as datasets_app  # noqa: E402
from orchestration.cli_run import register_run_commands  # noqa: E402

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
