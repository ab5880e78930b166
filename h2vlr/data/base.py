"""The adapter interface and the helpers adapters share."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from h2vlr.data.loading import IMAGE_SUFFIXES, is_image_file
from h2vlr.data.types import (
    CategoryData,
    CategoryReport,
    DatasetError,
    DatasetReport,
    Problem,
    Sample,
)

logger = logging.getLogger(__name__)

# Suffixes tried, in this order, after an image stem when looking for its mask file.
MASK_NAME_ENDINGS = tuple(f"_mask{s}" for s in IMAGE_SUFFIXES) + IMAGE_SUFFIXES


class DatasetAdapter(ABC):
    """Reads one dataset layout into ``CategoryData`` records.

    Subclasses set ``name`` and ``description`` and implement ``categories`` and
    ``scan_category``; ``load_category`` and ``check`` are built on them.
    """

    name: str = ""  # registry name, e.g. "mvtec"
    description: str = ""  # one line shown by ``h2vlr-bench datasets list``

    def resolve_root(self, root: Path | None) -> Path:
        """Return the dataset directory used for ``root``.

        Raises:
            DatasetError: ``root`` is None or not a directory.
        """
        if root is None:
            raise DatasetError(
                f"dataset {self.name!r} needs a data root; pass --data-root PATH "
                "pointing at the directory that contains its files"
            )
        resolved = Path(root).expanduser().absolute()
        if not resolved.is_dir():
            raise DatasetError(
                f"data root {resolved} of dataset {self.name!r} is not a directory; "
                "pass the directory that contains the dataset"
            )
        return resolved

    @abstractmethod
    def categories(self, root: Path | None) -> list[str]:
        """Return the sorted category names found under ``root``."""

    @abstractmethod
    def scan_category(self, root: Path, category: str) -> tuple[CategoryData, list[Problem]]:
        """Read one category of a resolved root; return its data and the problems found.

        Raises:
            DatasetError: The category cannot be read at all.
        """

    def load_category(self, root: Path | None, category: str) -> CategoryData:
        """Read one category; problems that leave it usable are logged as warnings.

        Raises:
            DatasetError: Unknown category, or a layout the adapter cannot read.
        """
        resolved = self.resolve_root(root)
        known = self.categories(resolved)
        if category not in known:
            raise DatasetError(
                f"category {category!r} not found in dataset {self.name!r} at {resolved}; "
                f"valid: {', '.join(known) or 'none'}"
            )
        data, problems = self.scan_category(resolved, category)
        for problem in problems:
            logger.warning("%s: %s", problem.path, problem.message)
        logger.info(
            "%s/%s: support pool %d, test %d images",
            self.name,
            category,
            len(data.support_pool),
            len(data.test),
        )
        return data

    def check(self, root: Path | None) -> DatasetReport:
        """Read every category and every file header; collect counts and problems."""
        try:
            resolved = self.resolve_root(root)
            names = self.categories(resolved)
        except DatasetError as exc:
            where = str(root) if root is not None else "--data-root"
            return DatasetReport(self.name, Path(where), {}, (Problem("error", where, str(exc)),))

        reports: dict[str, CategoryReport] = {}
        problems: list[Problem] = []
        if not names:
            message = (
                f"no categories found; pass the directory that contains the {self.name} "
                "dataset itself (not its parent), laid out as docs/datasets.md describes"
            )
            problems.append(Problem("error", str(resolved), message))
        for category in names:
            try:
                data, found = self.scan_category(resolved, category)
            except DatasetError as exc:
                problems.append(Problem("error", str(resolved / category), str(exc)))
                continue
            problems.extend(found)
            problems.extend(_usability_problems(data))
            problems.extend(_file_problems(data))
            reports[category] = CategoryReport.from_data(data)
        return DatasetReport(self.name, resolved, reports, tuple(problems))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def list_images(directory: Path) -> list[Path]:
    """Return the image files directly inside ``directory``, sorted by name."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if is_image_file(p))


def list_subdirs(directory: Path) -> list[Path]:
    """Return the visible subdirectories of ``directory``, sorted by name."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def make_sample(
    root: Path, path: Path, label: int, defect_type: str, mask_path: Path | None = None
) -> Sample:
    """Build a ``Sample`` whose ``rel_path`` is ``path`` relative to ``root``."""
    return Sample(
        path=path,
        rel_path=path.relative_to(root).as_posix(),
        label=label,
        defect_type=defect_type,
        mask_path=mask_path,
    )


class MaskFinder:
    """Finds the mask of an image stem in one directory (``STEM_mask.png``, ``STEM.png``, ...)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files = {p.name: p for p in list_images(directory)}

    def find(self, stem: str) -> Path | None:
        for ending in MASK_NAME_ENDINGS:
            found = self._files.get(stem + ending)
            if found is not None:
                return found
        return None


def build_category(
    dataset: str,
    category: str,
    root: Path,
    support_pool: Iterable[Sample],
    test: Iterable[Sample],
    has_masks: bool,
    class_name: str | None = None,
) -> CategoryData:
    """Sort both splits by ``rel_path`` and check that they are disjoint.

    Raises:
        DatasetError: A file is in both the support pool and the test split.
    """
    pool = tuple(sorted(support_pool, key=lambda s: s.rel_path))
    test_split = tuple(sorted(test, key=lambda s: s.rel_path))
    shared = {s.rel_path for s in pool} & {s.rel_path for s in test_split}
    if shared:
        example = sorted(shared)[0]
        raise DatasetError(
            f"{len(shared)} files of {dataset}/{category} are both support and test images "
            f"(e.g. {example}); a support image must never be a test image"
        )
    return CategoryData(
        dataset=dataset,
        category=category,
        class_name=class_name if class_name is not None else category.replace("_", " "),
        root=root,
        support_pool=pool,
        test=test_split,
        has_masks=has_masks,
    )


def _usability_problems(data: CategoryData) -> list[Problem]:
    where = str(data.root / data.category)
    problems = []
    if not data.support_pool:
        message = "no normal images for the support pool; few-shot jobs cannot run"
        problems.append(Problem("error", where, message))
    if not data.test_normal:
        problems.append(Problem("error", where, "no normal test images; metrics are undefined"))
    if not data.test_anomalous:
        problems.append(Problem("error", where, "no anomalous test images; metrics are undefined"))
    return problems


def _file_problems(data: CategoryData) -> list[Problem]:
    """Open every image and mask header; report unreadable files and size mismatches."""
    problems = []
    for sample in data.support_pool + data.test:
        size = _header_size(sample.path, problems)
        if sample.mask_path is None or size is None:
            continue
        mask_size = _header_size(sample.mask_path, problems)
        if mask_size is not None and mask_size != size:
            message = (
                f"mask size {mask_size[0]}x{mask_size[1]} differs from image size "
                f"{size[0]}x{size[1]} of {sample.rel_path}; the mask is resized with the image"
            )
            problems.append(Problem("warning", str(sample.mask_path), message))
    return problems


def _header_size(path: Path, problems: list[Problem]) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
        message = f"cannot read image: {exc}; replace or remove the file"
        problems.append(Problem("error", str(path), message))
        return None
