"""Anomaly detection methods behind one interface, registered by name."""

import importlib
import logging

from h2vlr.methods.base import AnomalyMethod, FitContext, QueryBatch, ScoreOutput
from h2vlr.methods.registry import (
    create_method,
    get_method_class,
    list_methods,
    parse_variant,
    register_method,
)

logger = logging.getLogger(__name__)

_BUILTIN = ("h2vlr", "clip_zeroshot", "winclip", "patch_knn")
for _module in _BUILTIN:
    importlib.import_module(f"h2vlr.methods.{_module}")

__all__ = [
    "AnomalyMethod",
    "FitContext",
    "QueryBatch",
    "ScoreOutput",
    "create_method",
    "get_method_class",
    "list_methods",
    "parse_variant",
    "register_method",
]
