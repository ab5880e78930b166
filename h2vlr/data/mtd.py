"""The Magnetic Tile defect set (MTD) in its published layout.

::

    MT_Free/Imgs/*.jpg        defect-free images (each with an all-black .png mask)
    MT_Blowhole/Imgs/*.jpg    anomalous images, each with a same-named .png mask
    MT_Break/ MT_Crack/ MT_Fray/ MT_Uneven/   likewise

One category, ``magnetic_tile``. The defect type is the directory name without the
``MT_`` prefix, in lower case. There is no training split: the MT_Free images are
divided into support pool and test normals by ``h2vlr.data.splits.split_normals``.
The masks of MT_Free images are ignored, so test normals count as normal.
"""

from __future__ import annotations

from pathlib import Path

from h2vlr.data.base import DatasetAdapter, build_category, list_subdirs, make_sample
from h2vlr.data.registry import register_dataset
from h2vlr.data.splits import split_normals
from h2vlr.data.types import CategoryData, DatasetError, Problem, Sample

CATEGORY = "magnetic_tile"
NORMAL_DIR = "MT_Free"
IMAGE_SUFFIXES = (".jpg", ".jpeg")  # masks are the same-named .png files


def _images(directory: Path) -> list[Path]:
    imgs = directory / "Imgs"
    if not imgs.is_dir():
        return []
    return sorted(p for p in imgs.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class MTDAdapter(DatasetAdapter):
    name = "mtd"
    description = (
        "Magnetic Tile defects (MT_Free/Imgs, MT_<Defect>/Imgs with .png masks); one category"
    )

    def categories(self, root: Path | None) -> list[str]:
        resolved = self.resolve_root(root)
        return [CATEGORY] if (resolved / NORMAL_DIR / "Imgs").is_dir() else []

    def scan_category(self, root: Path, category: str) -> tuple[CategoryData, list[Problem]]:
        if category != CATEGORY:
            raise DatasetError(f"mtd has one category, {CATEGORY!r}; got {category!r}")
        normals = [make_sample(root, p, 0, "good") for p in _images(root / NORMAL_DIR)]
        pool, test_normals = split_normals(normals)

        anomalous: list[Sample] = []
        problems: list[Problem] = []
        for directory in list_subdirs(root):
            if not directory.name.startswith("MT_") or directory.name == NORMAL_DIR:
                continue
            defect = directory.name[len("MT_") :].lower()
            for image in _images(directory):
                mask = image.with_suffix(".png")
                if not mask.is_file():
                    message = f"no mask for anomalous image; expected {mask.name} beside it"
                    problems.append(Problem("warning", str(image), message))
                    mask = None
                anomalous.append(make_sample(root, image, 1, defect, mask))

        data = build_category(
            self.name, category, root, pool, test_normals + tuple(anomalous), has_masks=True
        )
        return data, problems


register_dataset(MTDAdapter())
