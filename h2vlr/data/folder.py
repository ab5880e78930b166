"""The generic ``folder`` layout for users' own data.

::

    ROOT/CATEGORY/normal/*.png                  normal images
    ROOT/CATEGORY/anomalous/*.png               anomalous images, defect type "anomalous"
    ROOT/CATEGORY/anomalous/DEFECT/*.png        or one subdirectory per defect type
    ROOT/CATEGORY/masks/[DEFECT/]STEM.png       optional masks (STEM_mask.png also found)

``ROOT`` may itself be a single category (it then contains ``normal/`` and the
category is named after ``ROOT``). Normal images are split into support pool and test
normals by ``h2vlr.data.splits.split_normals``. The directory names are options of
``FolderAdapter``; the registered ``folder`` adapter uses the defaults above.
"""

from __future__ import annotations

from pathlib import Path

from h2vlr.data.base import (
    DatasetAdapter,
    MaskFinder,
    build_category,
    list_images,
    list_subdirs,
    make_sample,
)
from h2vlr.data.registry import register_dataset
from h2vlr.data.splits import split_normals
from h2vlr.data.types import CategoryData, DatasetError, Problem, Sample

FLAT_DEFECT_TYPE = "anomalous"  # defect type of images directly inside the anomalous directory


class FolderAdapter(DatasetAdapter):
    """Normal, anomalous and optional mask directories per category."""

    name = "folder"
    description = (
        "generic layout: CATEGORY/normal, CATEGORY/anomalous[/DEFECT], optional CATEGORY/masks"
    )

    def __init__(
        self,
        normal_dir: str = "normal",
        anomalous_dir: str = "anomalous",
        mask_dir: str = "masks",
        name: str | None = None,
    ) -> None:
        self.normal_dir = normal_dir  # directory of normal images inside a category
        self.anomalous_dir = anomalous_dir  # directory of anomalous images inside a category
        self.mask_dir = mask_dir  # optional directory mirroring anomalous_dir with masks
        if name is not None:
            self.name = name

    def _is_category(self, directory: Path) -> bool:
        return (directory / self.normal_dir).is_dir()

    def categories(self, root: Path | None) -> list[str]:
        resolved = self.resolve_root(root)
        if self._is_category(resolved):
            return [resolved.name]
        return [d.name for d in list_subdirs(resolved) if self._is_category(d)]

    def _category_dir(self, root: Path, category: str) -> Path:
        if self._is_category(root) and category == root.name:
            return root
        if self._is_category(root / category):
            return root / category
        raise DatasetError(
            f"no directory {root / category / self.normal_dir}; the folder layout needs "
            f"CATEGORY/{self.normal_dir} with the normal images"
        )

    def scan_category(self, root: Path, category: str) -> tuple[CategoryData, list[Problem]]:
        base = self._category_dir(root, category)
        normals = [make_sample(root, p, 0, "good") for p in list_images(base / self.normal_dir)]
        pool, test_normals = split_normals(normals)

        mask_root = base / self.mask_dir
        has_masks = mask_root.is_dir()
        problems: list[Problem] = []
        anomalous_root = base / self.anomalous_dir
        groups = [(anomalous_root, FLAT_DEFECT_TYPE, mask_root)]
        groups += [(d, d.name, mask_root / d.name) for d in list_subdirs(anomalous_root)]
        anomalous: list[Sample] = []
        for directory, defect, mask_dir in groups:
            anomalous.extend(
                self._scan_anomalous(root, directory, defect, mask_dir, has_masks, problems)
            )

        data = build_category(
            self.name, category, root, pool, test_normals + tuple(anomalous), has_masks
        )
        return data, problems

    def _scan_anomalous(
        self,
        root: Path,
        directory: Path,
        defect: str,
        mask_dir: Path,
        has_masks: bool,
        problems: list[Problem],
    ) -> list[Sample]:
        finder = MaskFinder(mask_dir)
        samples = []
        for image in list_images(directory):
            mask = finder.find(image.stem) if has_masks else None
            if has_masks and mask is None:
                message = f"no mask for anomalous image; expected {mask_dir}/{image.stem}.png"
                problems.append(Problem("warning", str(image), message))
            samples.append(make_sample(root, image, 1, defect, mask))
        return samples


register_dataset(FolderAdapter())
