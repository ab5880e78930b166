"""Medical datasets with image labels only: BrainMRI, Br35H and HeadCT.

BrainMRI and Br35H keep normal images in a folder ``no`` and anomalous ones in
``yes``, either directly under the data root or one directory below it (as in the
published archives). HeadCT has its images in a directory (``head_ct/``, possibly
nested once more, or the root itself) and a ``labels.csv`` whose rows give an image
number ``id`` and ``hemorrhage`` (0 or 1). None of them has masks or a training
split; normal images are split by ``h2vlr.data.splits.split_normals``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from h2vlr.data.base import DatasetAdapter, build_category, list_images, list_subdirs, make_sample
from h2vlr.data.registry import register_dataset
from h2vlr.data.splits import split_normals
from h2vlr.data.types import CategoryData, DatasetError, Problem, Sample


def _normal_anomalous_dirs(root: Path) -> tuple[Path, Path] | None:
    """Find the ``no`` and ``yes`` directories in ``root`` or one level below it."""
    for candidate in [root, *list_subdirs(root)]:
        if (candidate / "no").is_dir() and (candidate / "yes").is_dir():
            return candidate / "no", candidate / "yes"
    return None


class NoYesAdapter(DatasetAdapter):
    """One category with normal images in ``no/`` and anomalous ones in ``yes/``."""

    category = "brain_mri"  # the single category name
    defect_type = "tumor"  # defect type of every anomalous image

    def categories(self, root: Path | None) -> list[str]:
        found = _normal_anomalous_dirs(self.resolve_root(root))
        return [self.category] if found is not None else []

    def scan_category(self, root: Path, category: str) -> tuple[CategoryData, list[Problem]]:
        found = _normal_anomalous_dirs(root)
        if found is None or category != self.category:
            raise DatasetError(
                f"{self.name} expects the category {self.category!r} with folders no/ and "
                f"yes/ under {root}; got category {category!r}"
            )
        normal_dir, anomalous_dir = found
        normals = [make_sample(root, p, 0, "good") for p in list_images(normal_dir)]
        anomalous = [make_sample(root, p, 1, self.defect_type) for p in list_images(anomalous_dir)]
        pool, test_normals = split_normals(normals)
        data = build_category(
            self.name, category, root, pool, test_normals + tuple(anomalous), has_masks=False
        )
        return data, []


class BrainMRIAdapter(NoYesAdapter):
    name = "brainmri"
    description = (
        "Brain MRI tumour detection (folders no/ = normal, yes/ = tumour); image labels only"
    )


class Br35HAdapter(NoYesAdapter):
    name = "br35h"
    description = (
        "Br35H brain tumour detection (folders no/ = normal, yes/ = tumour); image labels only"
    )


HEADCT_CATEGORY = "head_ct"
LABELS_FILE = "labels.csv"


def _headct_image_dir(root: Path) -> Path | None:
    """Return the directory holding the HeadCT images: head_ct/head_ct, head_ct or root."""
    for candidate in (root / "head_ct" / "head_ct", root / "head_ct", root):
        if list_images(candidate):
            return candidate
    return None


def _read_headct_labels(path: Path) -> dict[int, int]:
    """Map image number to label from ``labels.csv`` (header ``id, hemorrhage``)."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        fields = [f.strip() for f in reader.fieldnames or []]
        if "id" not in fields or "hemorrhage" not in fields:
            raise DatasetError(
                f"{path} has the columns {fields}; expected the header 'id,hemorrhage'"
            )
        labels = {}
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items()}
            try:
                labels[int(row["id"])] = int(row["hemorrhage"])
            except ValueError as exc:
                raise DatasetError(
                    f"{path} has the row {row}; expected integer id and hemorrhage 0 or 1"
                ) from exc
        return labels


class HeadCTAdapter(DatasetAdapter):
    name = "headct"
    description = "Head CT hemorrhage (images named by number, labels.csv with id,hemorrhage); image labels only"

    def categories(self, root: Path | None) -> list[str]:
        resolved = self.resolve_root(root)
        return [HEADCT_CATEGORY] if (resolved / LABELS_FILE).is_file() else []

    def scan_category(self, root: Path, category: str) -> tuple[CategoryData, list[Problem]]:
        labels_path = root / LABELS_FILE
        image_dir = _headct_image_dir(root)
        if category != HEADCT_CATEGORY or image_dir is None or not labels_path.is_file():
            raise DatasetError(
                f"headct expects the category {HEADCT_CATEGORY!r}, {LABELS_FILE} in {root} "
                f"and images in head_ct/; got category {category!r}"
            )
        labels = _read_headct_labels(labels_path)

        normals: list[Sample] = []
        anomalous: list[Sample] = []
        problems: list[Problem] = []
        for image in list_images(image_dir):
            label = labels.get(int(image.stem)) if image.stem.isdigit() else None
            if label not in (0, 1):
                message = f"image has no 0/1 label in {LABELS_FILE} (by its number); skipped"
                problems.append(Problem("warning", str(image), message))
                continue
            if label == 0:
                normals.append(make_sample(root, image, 0, "good"))
            else:
                anomalous.append(make_sample(root, image, 1, "hemorrhage"))

        pool, test_normals = split_normals(normals)
        data = build_category(
            self.name, category, root, pool, test_normals + tuple(anomalous), has_masks=False
        )
        return data, problems


register_dataset(BrainMRIAdapter())
register_dataset(Br35HAdapter())
register_dataset(HeadCTAdapter())
