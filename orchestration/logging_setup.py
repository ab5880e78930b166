"""Rich logging for the CLI; library modules only create module loggers."""

from __future__ import annotations

import logging

from rich.logging import RichHandler

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure_logging(level: str = "INFO") -> None:
    """Route every log record through one Rich handler on stderr."""
    name = level.upper()
    if name not in LOG_LEVELS:
        raise ValueError(f"invalid log level {level!r}; valid: {', '.join(LOG_LEVELS)}")
    logging.basicConfig(
        level=name,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(rich_tracebacks=False, show_path=False)],
        force=True,
    )
