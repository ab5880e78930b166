"""The dataset registry: one adapter instance per name."""

from __future__ import annotations

from h2vlr.data.base import DatasetAdapter
from h2vlr.registry import Registry

_DATASETS: Registry[DatasetAdapter] = Registry("dataset")


def register_dataset(adapter: DatasetAdapter) -> DatasetAdapter:
    """Register ``adapter`` under ``adapter.name``.

    Raises:
        ValueError: The name is already registered.
    """
    return _DATASETS.register(adapter.name, adapter)


def get_dataset(name: str) -> DatasetAdapter:
    """Return the adapter registered as ``name``.

    Raises:
        UnknownNameError: No adapter has that name; the message lists the valid names.
    """
    return _DATASETS.get(name)


def list_datasets() -> list[str]:
    """Return the registered dataset names, sorted."""
    return _DATASETS.names()
