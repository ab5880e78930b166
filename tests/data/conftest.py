"""Synthetic dataset trees, one per layout, with tiny images.

Each fixture writes the native layout of one dataset under ``tmp_path`` and returns
its root. Image content does not matter to the adapters, so images are 8x8 pixels; a
mask has the same size with one non-zero square.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIDE = 8  # side of every synthetic image, pixels


def write_image(path: Path, value: int = 128) -> Path:
    """Write a ``SIDE``x``SIDE`` RGB image of one grey level (any suffix PIL can save)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((SIDE, SIDE, 3), value, dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


def write_gray(path: Path, value: int = 128) -> Path:
    """Write a ``SIDE``x``SIDE`` 8-bit greyscale image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((SIDE, SIDE), value, dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path, anomalous: bool = True) -> Path:
    """Write a {0, 255} mask with a 3x3 anomalous square, or an all-black one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((SIDE, SIDE), dtype=np.uint8)
    if anomalous:
        array[2:5, 2:5] = 255
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """Two categories: metal_nut (5 train, 2 test good, scratch x2, color x1) and bottle."""
    root = tmp_path / "mvtec"
    for i in range(5):
        write_image(root / "metal_nut" / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        write_image(root / "metal_nut" / "test" / "good" / f"{i:03d}.png")
        write_image(root / "metal_nut" / "test" / "scratch" / f"{i:03d}.png", 30)
        write_mask(root / "metal_nut" / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    write_image(root / "metal_nut" / "test" / "color" / "000.png", 60)
    write_mask(root / "metal_nut" / "ground_truth" / "color" / "000_mask.png")
    for i in range(3):
        write_image(root / "bottle" / "train" / "good" / f"{i:03d}.png")
    write_image(root / "bottle" / "test" / "good" / "000.png")
    write_image(root / "bottle" / "test" / "broken_large" / "000.png", 20)
    write_mask(root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png")
    (root / "license.txt").write_text("not a category\n")
    return root


@pytest.fixture
def btad_root(tmp_path: Path) -> Path:
    """Category 03 with .bmp images and .png masks named like their images."""
    root = tmp_path / "btad"
    for i in range(4):
        write_image(root / "03" / "train" / "ok" / f"{i:04d}.bmp")
    for i in range(2):
        write_image(root / "03" / "test" / "ok" / f"{i:04d}.bmp")
    for i in range(3):
        write_image(root / "03" / "test" / "ko" / f"{i:04d}.bmp", 10)
        write_mask(root / "03" / "ground_truth" / "ko" / f"{i:04d}.png")
    return root


VISA_ROWS = [
    ("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
    ("candle", "train", "normal", "candle/Data/Images/Normal/0001.JPG", ""),
    ("candle", "train", "normal", "candle/Data/Images/Normal/0002.JPG", ""),
    ("candle", "test", "normal", "candle/Data/Images/Normal/0003.JPG", ""),
    (
        "candle",
        "test",
        "anomaly",
        "candle/Data/Images/Anomaly/000.JPG",
        "candle/Data/Masks/Anomaly/000.png",
    ),
    (
        "candle",
        "test",
        "anomaly",
        "candle/Data/Images/Anomaly/001.JPG",
        "candle/Data/Masks/Anomaly/001.png",
    ),
    ("pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""),
    ("pcb1", "test", "normal", "pcb1/Data/Images/Normal/0001.JPG", ""),
    (
        "pcb1",
        "test",
        "anomaly",
        "pcb1/Data/Images/Anomaly/000.JPG",
        "pcb1/Data/Masks/Anomaly/000.png",
    ),
]


@pytest.fixture
def visa_root(tmp_path: Path) -> Path:
    """Two objects listed in split_csv/1cls.csv; VisA masks use small label values."""
    root = tmp_path / "visa"
    lines = ["object,split,label,image,mask"]
    for obj, split, label, image, mask in VISA_ROWS:
        lines.append(",".join((obj, split, label, image, mask)))
        write_image(root / image, 40 if label == "anomaly" else 128)
        if mask:
            path = root / mask
            path.parent.mkdir(parents=True, exist_ok=True)
            array = np.zeros((SIDE, SIDE), dtype=np.uint8)
            array[1:3, 1:3] = 1
            Image.fromarray(array).save(path)
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    return root


MTD_ANOMALOUS = {"MT_Blowhole": 3, "MT_Break": 2, "MT_Crack": 1, "MT_Fray": 1, "MT_Uneven": 2}


@pytest.fixture
def mtd_root(tmp_path: Path) -> Path:
    """MTD layout: 10 MT_Free images with all-black masks, 9 anomalous with masks."""
    root = tmp_path / "magnetic-tile"
    for i in range(10):
        write_gray(root / "MT_Free" / "Imgs" / f"exp{i}_num_{i * 7}.jpg")
        write_mask(root / "MT_Free" / "Imgs" / f"exp{i}_num_{i * 7}.png", anomalous=False)
    for directory, count in MTD_ANOMALOUS.items():
        for i in range(count):
            write_gray(root / directory / "Imgs" / f"exp{i}_num_{i}.jpg", 30)
            write_mask(root / directory / "Imgs" / f"exp{i}_num_{i}.png")
    (root / "README.md").write_text("Magnetic tile\n")
    return root


@pytest.fixture
def brainmri_root(tmp_path: Path) -> Path:
    """BrainMRI as unpacked: one directory level above no/ and yes/."""
    root = tmp_path / "brainmri"
    for i in range(7):
        write_image(root / "brain_tumor_dataset" / "no" / f"No{i}.jpg")
    for i in range(5):
        write_image(root / "brain_tumor_dataset" / "yes" / f"Y{i}.JPG", 200)
    return root


@pytest.fixture
def br35h_root(tmp_path: Path) -> Path:
    """Br35H: no/ and yes/ at the root, plus the unlabelled pred/ folder."""
    root = tmp_path / "br35h"
    for i in range(6):
        write_image(root / "no" / f"no{i}.jpg")
        write_image(root / "yes" / f"y{i}.jpg", 200)
    write_image(root / "pred" / "pred0.jpg")
    return root


@pytest.fixture
def headct_root(tmp_path: Path) -> Path:
    """HeadCT: head_ct/head_ct/NNN.png and labels.csv with a spaced header."""
    root = tmp_path / "headct"
    labels = ["id, hemorrhage"]
    for i in range(10):
        write_gray(root / "head_ct" / "head_ct" / f"{i:03d}.png")
        labels.append(f"{i}, {1 if i < 4 else 0}")
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    return root


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """Generic layout: one category with defect subdirectories, one flat without masks."""
    root = tmp_path / "own"
    for i in range(6):
        write_image(root / "widget" / "normal" / f"n{i}.png")
    for defect, count in (("dent", 2), ("crack", 1)):
        for i in range(count):
            write_image(root / "widget" / "anomalous" / defect / f"a{i}.png", 10)
            write_mask(root / "widget" / "masks" / defect / f"a{i}.png")
    for i in range(4):
        write_image(root / "gadget" / "normal" / f"n{i}.jpg")
    for i in range(2):
        write_image(root / "gadget" / "anomalous" / f"a{i}.jpg", 10)
    return root


class TreeWriter:
    """The file writers above, for tests that build their own broken trees."""

    image = staticmethod(write_image)
    gray = staticmethod(write_gray)
    mask = staticmethod(write_mask)


@pytest.fixture
def tree_writer() -> type[TreeWriter]:
    return TreeWriter
