"""Pixel metrics of a job whose dataset has masks but misses one."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from h2vlr.data import get_dataset
from orchestration.job import evaluate_job, pixel_truth

SIDE = 8  # side of the synthetic images and masks, pixels


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def folder_category(root: Path, masked: int, unmasked: int) -> Path:
    """Write a ``folder`` category: 6 normals, anomalous images with and without a mask."""
    for i in range(6):
        write_png(root / "widget" / "normal" / f"n{i}.png", np.full((SIDE, SIDE, 3), 128, np.uint8))
    for i in range(masked + unmasked):
        write_png(
            root / "widget" / "anomalous" / f"a{i}.png", np.full((SIDE, SIDE, 3), 9, np.uint8)
        )
        if i < masked:
            mask = np.zeros((SIDE, SIDE), np.uint8)
            mask[2:5, 2:5] = 255
            write_png(root / "widget" / "masks" / f"a{i}.png", mask)
    return root


def synthetic_outputs(data, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``[B]`` and maps ``[B, S, S]``: anomalous images have higher map values everywhere."""
    rng = np.random.default_rng(0)
    labels = np.array([s.label for s in data.test])
    scores = labels + rng.uniform(0.0, 1.5, len(labels))
    maps = rng.uniform(0.0, 1.0, (len(labels), size, size)).astype(np.float32)
    maps[labels == 1] += 0.5
    return scores, maps


def test_unmasked_anomalous_image_left_out_of_pixels(tmp_path, tiny_backbone, caplog):
    root = folder_category(tmp_path / "own", masked=2, unmasked=1)
    data = get_dataset("folder").load_category(root, "widget")
    assert data.has_masks
    size = tiny_backbone.image_size
    scores, maps = synthetic_outputs(data, size)

    with caplog.at_level(logging.WARNING, logger="orchestration.job"):
        result, excluded = evaluate_job("job-a", tiny_backbone, data, scores, maps)

    assert excluded == 1
    records = [r for r in caplog.records if r.name == "orchestration.job"]
    assert len(records) == 1
    assert "1 anomalous test images have no mask" in records[0].message
    labels = np.array([s.label for s in data.test])
    assert result.values["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    # Independent ground truth: the kept images are every image with a known mask.
    keep = np.array([s.label == 0 or s.mask_path is not None for s in data.test])
    assert keep.sum() == len(data.test) - 1
    square = np.zeros((SIDE, SIDE), bool)
    square[2:5, 2:5] = True
    masks = np.stack(
        [
            tiny_backbone.preprocess_mask(square if s.label else np.zeros_like(square))
            for s in np.array(data.test)[keep]
        ]
    )
    pixel_truth_flat, pixel_maps_flat = masks.ravel(), maps[keep].ravel()
    assert result.values["pixel_auroc"] == pytest.approx(
        roc_auc_score(pixel_truth_flat, pixel_maps_flat)
    )
    assert result.values["pixel_ap"] == pytest.approx(
        average_precision_score(pixel_truth_flat, pixel_maps_flat)
    )
    assert all(result.reasons[name] == "" for name in result.values)
    # Counting the unmasked image's high pixels as normal would give a lower AUROC.
    all_zero = np.concatenate([masks.ravel(), np.zeros(size * size, bool)])
    unmasked_map = maps[~keep].ravel()
    assert result.values["pixel_auroc"] > roc_auc_score(
        all_zero, np.concatenate([pixel_maps_flat, unmasked_map])
    )


def test_no_masked_anomalous_image_left(tmp_path, tiny_backbone):
    root = folder_category(tmp_path / "own", masked=0, unmasked=2)
    (root / "widget" / "masks").mkdir()  # the dataset has masks, none of these images does
    data = get_dataset("folder").load_category(root, "widget")
    scores, maps = synthetic_outputs(data, tiny_backbone.image_size)

    result, excluded = evaluate_job("job-b", tiny_backbone, data, scores, maps)

    assert excluded == 2
    assert not math.isnan(result.values["image_auroc"])
    for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"):
        assert math.isnan(result.values[name])
        assert result.reasons[name] == "no anomalous pixel in the masks"


def test_complete_masks_keep_every_image(tmp_path, tiny_backbone):
    root = folder_category(tmp_path / "own", masked=2, unmasked=0)
    data = get_dataset("folder").load_category(root, "widget")

    size = tiny_backbone.image_size
    truth = pixel_truth(data.test, True, size, tiny_backbone.preprocess_mask)

    assert truth.n_excluded == 0
    assert truth.keep.all()
    assert truth.masks.shape == (len(data.test), size, size)
    scale = size // SIDE
    assert truth.masks.sum() == 2 * (3 * scale) ** 2  # one 3x3 square per anomalous image
