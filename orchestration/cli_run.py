"""Placeholder, replaced by its owner."""
import typer


def register_run_commands(app: typer.Typer) -> None:
    pass
