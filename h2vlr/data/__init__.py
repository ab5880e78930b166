"""Datasets: adapters for native layouts, loading rules and support sampling.

Importing the package registers every built-in adapter.
"""

from h2vlr.data import demo, folder, medical, mtd, mvtec, visa  # noqa: F401  (registers adapters)
from h2vlr.data.base import DatasetAdapter
from h2vlr.data.loading import load_image, load_mask, resize_mask
from h2vlr.data.registry import get_dataset, list_datasets, register_dataset
from h2vlr.data.sampling import SupportLists, load_support_lists, sample_support
from h2vlr.data.types import (
    CategoryData,
    CategoryReport,
    DatasetError,
    DatasetReport,
    Problem,
    Sample,
)

__all__ = [
    "CategoryData",
    "CategoryReport",
    "DatasetAdapter",
    "DatasetError",
    "DatasetReport",
    "Problem",
    "Sample",
    "SupportLists",
    "get_dataset",
    "list_datasets",
    "load_image",
    "load_mask",
    "load_support_lists",
    "register_dataset",
    "resize_mask",
    "sample_support",
]
