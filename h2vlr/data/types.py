"""Records shared by every dataset adapter: samples, categories and check reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


class DatasetError(ValueError):
    """Raised when a dataset tree cannot be read as the layout its adapter expects."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset with its label and optional pixel ground truth."""

    path: Path  # absolute path of the image file
    rel_path: str  # posix path relative to the dataset root (recorded in results)
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images
    mask_path: Path | None  # pixel ground truth; None for normal images or mask-less datasets


@dataclass(frozen=True)
class CategoryData:
    """The support pool and test split of one category."""

    dataset: str  # registered adapter name
    category: str  # category name as the adapter lists it (a directory name, usually)
    class_name: str  # words used in prompts, e.g. "metal nut", "magnetic tile"
    root: Path  # dataset root (the --data-root)
    support_pool: tuple[
        Sample, ...
    ]  # normal images a support set may be drawn from, sorted by rel_path
    test: tuple[Sample, ...]  # test split, sorted by rel_path; disjoint from support_pool
    has_masks: bool  # the dataset provides pixel masks for its anomalous images

    @property
    def test_normal(self) -> tuple[Sample, ...]:
        """Normal images of the test split."""
        return tuple(s for s in self.test if s.label == 0)

    @property
    def test_anomalous(self) -> tuple[Sample, ...]:
        """Anomalous images of the test split."""
        return tuple(s for s in self.test if s.label == 1)

    @property
    def defect_types(self) -> tuple[str, ...]:
        """Sorted defect types of the anomalous test images."""
        return tuple(sorted({s.defect_type for s in self.test if s.label == 1}))


Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One finding of a dataset check; an error makes the dataset unusable."""

    severity: Severity  # "error" stops the dataset from being used, "warning" does not
    path: str  # the file or directory concerned
    message: str  # what is wrong and how to fix it


@dataclass(frozen=True)
class CategoryReport:
    """Counts of one category as a job would see them."""

    support_pool: int  # normal images a support set may be drawn from
    test_normal: int  # normal images of the test split
    test_anomalous: int  # anomalous images of the test split
    masks: int  # anomalous test images with a mask file
    defect_types: tuple[str, ...]  # sorted defect types of the anomalous test images

    @classmethod
    def from_data(cls, data: CategoryData) -> CategoryReport:
        anomalous = data.test_anomalous
        return cls(
            support_pool=len(data.support_pool),
            test_normal=len(data.test_normal),
            test_anomalous=len(anomalous),
            masks=sum(1 for s in anomalous if s.mask_path is not None),
            defect_types=data.defect_types,
        )


@dataclass(frozen=True)
class DatasetReport:
    """Result of ``DatasetAdapter.check``: per-category counts and the problems found."""

    dataset: str  # registered adapter name
    root: Path  # directory that was checked
    categories: dict[str, CategoryReport] = field(default_factory=dict)  # readable categories
    problems: tuple[Problem, ...] = ()  # findings, each naming its file

    @property
    def usable(self) -> bool:
        """True when at least one category was read and no problem is an error."""
        has_error = any(p.severity == "error" for p in self.problems)
        return bool(self.categories) and not has_error

    def to_dict(self) -> dict[str, object]:
        """Return the JSON-ready form printed by ``h2vlr-bench datasets check --json``."""
        categories = {
            name: {
                "support_pool": report.support_pool,
                "test_normal": report.test_normal,
                "test_anomalous": report.test_anomalous,
                "masks": report.masks,
                "defect_types": list(report.defect_types),
            }
            for name, report in self.categories.items()
        }
        problems = [
            {"severity": p.severity, "path": p.path, "message": p.message} for p in self.problems
        ]
        return {
            "dataset": self.dataset,
            "root": str(self.root),
            "usable": self.usable,
            "categories": categories,
            "problems": problems,
        }
