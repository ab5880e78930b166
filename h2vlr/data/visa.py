"""VisA, read through its split file ``split_csv/1cls.csv``.

Each row of the split file names ``object, split, label, image, mask``: ``split`` is
``train`` or ``test``, ``label`` is ``normal`` or ``anomaly``, and ``image`` and
``mask`` are paths relative to the data root (``mask`` is empty for normal images).
The training rows of an object form its support pool. VisA gives no defect type per
image in this file, so every anomalous image has the defect type ``anomaly``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from h2vlr.data.base import DatasetAdapter, build_category, make_sample
from h2vlr.data.registry import register_dataset
from h2vlr.data.types import CategoryData, DatasetError, Problem, Sample

SPLIT_FILE = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")


def read_split_rows(root: Path) -> list[dict[str, str]]:
    """Return the rows of ``split_csv/1cls.csv`` with stripped values.

    Raises:
        DatasetError: The file is missing or lacks a required column.
    """
    path = root / SPLIT_FILE
    if not path.is_file():
        raise DatasetError(
            f"missing split file {path}; the visa layout needs split_csv/1cls.csv "
            "as distributed with VisA"
        )
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in reader.fieldnames or []]
        missing = [c for c in _COLUMNS if c not in fields]
        if missing:
            raise DatasetError(
                f"split file {path} lacks the columns {', '.join(missing)}; "
                f"expected the header {','.join(_COLUMNS)}"
            )
        return [{k.strip(): (v or "").strip() for k, v in row.items()} for row in reader]


class VisAAdapter(DatasetAdapter):
    name = "visa"
    description = "VisA with its split file split_csv/1cls.csv (object, split, label, image, mask)"

    def categories(self, root: Path | None) -> list[str]:
        rows = read_split_rows(self.resolve_root(root))
        return sorted({row["object"] for row in rows})

    def scan_category(self, root: Path, category: str) -> tuple[CategoryData, list[Problem]]:
        pool: list[Sample] = []
        test: list[Sample] = []
        problems: list[Problem] = []
        for row in read_split_rows(root):
            if row["object"] != category:
                continue
            sample = self._row_sample(root, row, problems)
            if sample is None:
                continue
            if row["split"] == "test":
                test.append(sample)
            elif sample.label == 0:
                pool.append(sample)
            else:
                message = "anomalous image in the train split cannot be a support image; skipped"
                problems.append(Problem("warning", str(sample.path), message))
        data = build_category(self.name, category, root, pool, test, has_masks=True)
        return data, problems

    def _row_sample(
        self, root: Path, row: dict[str, str], problems: list[Problem]
    ) -> Sample | None:
        image = root / row["image"]
        split_file = str(root / SPLIT_FILE)
        if row["split"] not in ("train", "test") or row["label"] not in ("normal", "anomaly"):
            message = (
                f"row for {row['image']} has split {row['split']!r} and label "
                f"{row['label']!r}; expected train/test and normal/anomaly, row skipped"
            )
            problems.append(Problem("warning", split_file, message))
            return None
        if not image.is_file():
            message = f"image listed in {SPLIT_FILE.as_posix()} is missing; row skipped"
            problems.append(Problem("warning", str(image), message))
            return None
        if row["label"] == "normal":
            return make_sample(root, image, 0, "good")

        mask = root / row["mask"] if row["mask"] else None
        if mask is None or not mask.is_file():
            message = f"no mask file for anomalous image {row['image']}"
            problems.append(Problem("warning", str(mask or image), message))
            mask = None
        return make_sample(root, image, 1, "anomaly", mask)


register_dataset(VisAAdapter())
