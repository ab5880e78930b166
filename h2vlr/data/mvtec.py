"""Layouts with a training split of normal images: MVTec AD (also MPDD, DTD-Synthetic) and BTAD.

MVTec AD::

    CATEGORY/train/good/*.png
    CATEGORY/test/good/*.png
    CATEGORY/test/DEFECT/*.png
    CATEGORY/ground_truth/DEFECT/STEM_mask.png

BTAD uses ``ok`` for normal images and ``ko`` for anomalous ones, with masks named
``STEM.png`` under ``NN/ground_truth/ko``.
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
from h2vlr.data.types import CategoryData, DatasetError, Problem, Sample


class TrainTestAdapter(DatasetAdapter):
    """``CATEGORY/train/NORMAL``, ``CATEGORY/test/{NORMAL,DEFECT...}``, ``CATEGORY/ground_truth/DEFECT``."""

    normal_dir = "good"  # name of the normal-image directory under train/ and test/

    def categories(self, root: Path | None) -> list[str]:
        resolved = self.resolve_root(root)
        return [
            d.name
            for d in list_subdirs(resolved)
            if (d / "train").is_dir() and (d / "test").is_dir()
        ]

    def class_name(self, category: str) -> str:
        """Return the words used in prompts for ``category``."""
        return category.replace("_", " ")

    def scan_category(self, root: Path, category: str) -> tuple[CategoryData, list[Problem]]:
        base = root / category
        train_dir = base / "train" / self.normal_dir
        if not train_dir.is_dir():
            raise DatasetError(
                f"missing directory {train_dir}; the {self.name} layout keeps normal "
                f"training images in CATEGORY/train/{self.normal_dir}"
            )
        pool = [make_sample(root, p, 0, "good") for p in list_images(train_dir)]

        problems: list[Problem] = []
        gt_root = base / "ground_truth"
        has_masks = gt_root.is_dir()
        if not has_masks:
            message = "no ground_truth directory; pixel metrics will be NaN for this category"
            problems.append(Problem("warning", str(gt_root), message))

        test: list[Sample] = []
        for defect_dir in list_subdirs(base / "test"):
            test.extend(self._scan_test_dir(root, defect_dir, gt_root, has_masks, problems))

        data = build_category(
            self.name, category, root, pool, test, has_masks, self.class_name(category)
        )
        return data, problems

    def _scan_test_dir(
        self,
        root: Path,
        defect_dir: Path,
        gt_root: Path,
        has_masks: bool,
        problems: list[Problem],
    ) -> list[Sample]:
        if defect_dir.name == self.normal_dir:
            return [make_sample(root, p, 0, "good") for p in list_images(defect_dir)]

        finder = MaskFinder(gt_root / defect_dir.name)
        samples = []
        for path in list_images(defect_dir):
            mask = finder.find(path.stem) if has_masks else None
            if has_masks and mask is None:
                message = (
                    f"no mask for anomalous image {path.relative_to(root).as_posix()}; "
                    f"expected {finder.directory}/{path.stem}_mask.png or {path.stem}.png"
                )
                problems.append(Problem("warning", str(path), message))
            samples.append(make_sample(root, path, 1, defect_dir.name, mask))
        return samples


class MVTecAdapter(TrainTestAdapter):
    name = "mvtec"
    description = "MVTec AD layout (CATEGORY/train/good, test/DEFECT, ground_truth); also MPDD and DTD-Synthetic"


class BTADAdapter(TrainTestAdapter):
    name = "btad"
    description = "BTAD layout (NN/train/ok, NN/test/ok, NN/test/ko, NN/ground_truth/ko)"
    normal_dir = "ok"

    def class_name(self, category: str) -> str:
        # NOTE: BTAD names its three products only by number, so prompts get a generic noun.
        return f"product {category}"


register_dataset(MVTecAdapter())
register_dataset(BTADAdapter())
