"""Tests of h2vlr.metrics against hand-worked cases, scikit-learn and a brute-force AUPRO."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from h2vlr import metrics
from h2vlr.metrics import (
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    NonFiniteScoreError,
    aupro,
    auroc,
    average_precision,
    evaluate,
    f1_max,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
)


def _sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall,
        denominator,
        out=np.zeros_like(denominator),
        where=denominator > 0,
    )
    return float(f1.max())


def _brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Compute AUPRO threshold by threshold with explicit region loops and np.interp."""
    regions = []
    for mask, score_map in zip(masks, maps, strict=True):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.extend(score_map[labelled == index] for index in range(1, count + 1))
    normal_scores = maps[~masks]

    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        fprs.append(float(np.mean(normal_scores >= threshold)))
        pros.append(float(np.mean([np.mean(region >= threshold) for region in regions])))
    fprs, pros = np.array(fprs), np.array(pros)

    inside = fprs <= fpr_limit
    xs, ys = fprs[inside], pros[inside]
    if not inside.all():
        first_outside = np.flatnonzero(~inside)[0]
        segment = slice(first_outside - 1, first_outside + 1)
        xs = np.append(xs, fpr_limit)
        ys = np.append(ys, np.interp(fpr_limit, fprs[segment], pros[segment]))
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2) / fpr_limit)


def _blob_masks(rng: np.random.Generator, n_images: int, size: int) -> np.ndarray:
    """Return bool masks with a few random rectangles in about half of the images."""
    masks = np.zeros((n_images, size, size), dtype=bool)
    for mask in masks[: n_images // 2 + 1]:
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, size - 3, size=2)
            h, w = rng.integers(1, size // 3 + 2, size=2)
            mask[y : y + h, x : x + w] = True
    return masks


def _hand_worked_pixels() -> tuple[np.ndarray, np.ndarray]:
    """Return the two 4x4 images: A anomalous in its top-left 2x2 block, B normal."""
    image_a = np.full((4, 4), 0.1, dtype=np.float32)
    image_a[0, :2] = 0.9
    image_a[1, :2] = 0.4
    image_b = np.full(16, 0.1, dtype=np.float32)
    image_b[:7] = 0.6
    maps = np.stack([image_a, image_b.reshape(4, 4)])
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2, :2] = True
    return masks, maps


# ----------------------------------------------------------------------------------------
# Hand-worked cases


def test_aupro_hand_worked_case():
    masks, maps = _hand_worked_pixels()

    # PRO 0.5 from FPR 0 to 0.25 (7 of 28 normal pixels), then 1.0 up to the limit.
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.175 / 0.3, abs=1e-12)


def test_aupro_hand_worked_full_range():
    masks, maps = _hand_worked_pixels()

    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5 * 0.25 + 1.0 * 0.75, abs=1e-12)


def test_pixel_auroc_hand_worked_case():
    masks, maps = _hand_worked_pixels()

    # Two anomalous pixels at 0.9 beat all 28 normal pixels, two at 0.4 beat 21 of them.
    assert pixel_auroc(masks, maps) == pytest.approx((2 * 28 + 2 * 21) / (4 * 28), abs=1e-12)
    assert pixel_auroc(masks, maps) == pytest.approx(0.875, abs=1e-12)


def test_aupro_interpolates_at_limit():
    """A tied positive and negative make a diagonal PRO segment that crosses FPR 0.3."""
    masks = np.zeros((1, 3, 4), dtype=bool)
    masks[0, 0, :2] = True
    maps = np.full((1, 3, 4), 0.1, dtype=np.float32)
    maps[0, 0, :2] = [0.9, 0.3]
    maps[0, 0, 2:] = 0.5
    maps[0, 1, :2] = 0.3
    # Curve points: (0, 0.5), (0.2, 0.5), (0.4, 1.0), (1, 1). PRO at FPR 0.3 is 0.75.
    expected = (0.2 * 0.5 + 0.1 * (0.5 + 0.75) / 2) / 0.3

    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(expected, abs=1e-12)


def test_aupro_regions_eight_connected():
    """A pixel touching an L-shaped region only at a corner joins that region."""
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 0] = True
    masks[0, 2, 1] = True  # diagonal neighbour of (1, 0)
    maps = np.full((1, 4, 4), 0.1, dtype=np.float32)
    maps[0, 2, 1] = 0.9
    maps[0, 0, 0] = maps[0, 0, 1] = maps[0, 1, 0] = 0.5
    maps[0, 3, 1:] = 0.7  # 3 of the 12 normal pixels, FPR 0.25

    # One region of 4 pixels: PRO 0.25 up to FPR 0.25, then 1. Two regions would give 0.5.
    expected = (0.25 * 0.25 + 0.05 * 1.0) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_f1_max_hand_worked_case():
    # Threshold 0.2 flags 0.2, 0.3, 0.4: precision 2/3, recall 1, F1 0.8.
    assert f1_max([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.8, abs=1e-12)


def test_f1_max_all_normal_nan():
    assert math.isnan(f1_max([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4]))


def test_auroc_one_class_nan():
    assert math.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auroc([0, 0, 0], [0.1, 0.2, 0.3]))


def test_average_precision_all_normal_nan():
    assert math.isnan(average_precision([0, 0], [0.3, 0.4]))


def test_pixel_metrics_perfect_maps():
    masks, _ = _hand_worked_pixels()
    maps = masks.astype(np.float32)

    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_ap(masks, maps) == 1.0
    assert pixel_f1_max(masks, maps) == 1.0
    assert aupro(masks, maps) == 1.0


def test_pixel_metrics_no_anomalous_pixel_nan():
    masks = np.zeros((2, 4, 4), dtype=bool)
    maps = np.random.default_rng(0).random((2, 4, 4), dtype=np.float32)

    assert math.isnan(pixel_auroc(masks, maps))
    assert math.isnan(pixel_ap(masks, maps))
    assert math.isnan(pixel_f1_max(masks, maps))
    assert math.isnan(aupro(masks, maps))


# ----------------------------------------------------------------------------------------
# Agreement with scikit-learn


@pytest.mark.parametrize("seed", range(8))
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.normal(labels * 0.5, 1.0)
    if seed % 2:
        scores = np.round(scores, 1)  # many ties

    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-6
    )
    assert f1_max(labels, scores) == pytest.approx(_sklearn_f1_max(labels, scores), abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_match_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    masks = _blob_masks(rng, n_images=6, size=24)
    maps = (rng.random(masks.shape) + 0.6 * masks).astype(np.float32)
    if seed % 2:
        maps = np.round(maps, 2).astype(np.float32)
    flat_labels, flat_scores = masks.ravel(), maps.ravel().astype(np.float64)

    assert pixel_auroc(masks, maps) == pytest.approx(
        roc_auc_score(flat_labels, flat_scores), abs=1e-6
    )
    assert pixel_ap(masks, maps) == pytest.approx(
        average_precision_score(flat_labels, flat_scores), abs=1e-6
    )
    assert pixel_f1_max(masks, maps) == pytest.approx(
        _sklearn_f1_max(flat_labels, flat_scores), abs=1e-6
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 50])
def test_chunked_walk_matches_sklearn(monkeypatch, chunk_size):
    """Thresholds walked in small chunks, ties across chunk borders included, give the same values."""
    monkeypatch.setattr(metrics, "_CHUNK_SIZE", chunk_size)
    rng = np.random.default_rng(chunk_size)
    masks = _blob_masks(rng, n_images=3, size=12)
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 1).astype(np.float32)
    flat_labels, flat_scores = masks.ravel(), maps.ravel().astype(np.float64)

    result = evaluate(masks.any(axis=(1, 2)).astype(int), maps.max(axis=(1, 2)), masks, maps)

    assert result.values["pixel_auroc"] == pytest.approx(
        roc_auc_score(flat_labels, flat_scores), abs=1e-9
    )
    assert result.values["pixel_ap"] == pytest.approx(
        average_precision_score(flat_labels, flat_scores), abs=1e-9
    )
    assert result.values["pixel_f1_max"] == pytest.approx(
        _sklearn_f1_max(flat_labels, flat_scores), abs=1e-9
    )
    assert result.values["pixel_aupro"] == pytest.approx(
        _brute_force_aupro(masks, maps, 0.3), abs=1e-9
    )


# ----------------------------------------------------------------------------------------
# AUPRO against a brute-force computation


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_aupro_matches_brute_force(seed, fpr_limit):
    rng = np.random.default_rng(200 + seed)
    masks = _blob_masks(rng, n_images=4, size=16)
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 2).astype(np.float32)

    expected = _brute_force_aupro(masks, maps, fpr_limit)

    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_in_unit_interval():
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng, n_images=4, size=16)
    maps = rng.random(masks.shape).astype(np.float32)

    value = aupro(masks, maps)

    assert 0.0 <= value <= 1.0


def test_aupro_invariant_to_monotone_rescaling():
    rng = np.random.default_rng(4)
    masks = _blob_masks(rng, n_images=4, size=16)
    maps = rng.random(masks.shape).astype(np.float32)

    assert aupro(masks, maps) == pytest.approx(aupro(masks, 3.0 * maps + 1.0), abs=1e-12)


def test_aupro_invalid_fpr_limit_rejected():
    masks, maps = _hand_worked_pixels()

    with pytest.raises(ValueError, match="fpr_limit must lie in"):
        aupro(masks, maps, fpr_limit=0.0)


# ----------------------------------------------------------------------------------------
# Input handling


def test_metrics_leave_inputs_unchanged():
    masks, maps = _hand_worked_pixels()
    maps_before, masks_before = maps.copy(), masks.copy()
    scores = np.array([0.4, 0.1, 0.3])
    scores_before = scores.copy()

    evaluate([1, 0, 1], scores)
    evaluate([1, 0], [0.9, 0.6], masks, maps)

    np.testing.assert_array_equal(maps, maps_before)
    np.testing.assert_array_equal(masks, masks_before)
    np.testing.assert_array_equal(scores, scores_before)


def test_masks_nonzero_values_anomalous():
    masks, maps = _hand_worked_pixels()

    assert aupro((masks * 255).astype(np.uint8), maps) == pytest.approx(aupro(masks, maps))


def test_non_finite_scores_rejected():
    with pytest.raises(NonFiniteScoreError, match="1 NaN and 2 infinite values out of 5"):
        auroc([0, 1, 0, 1, 1], [0.1, np.nan, np.inf, -np.inf, 0.2])


def test_non_finite_maps_rejected():
    masks, maps = _hand_worked_pixels()
    maps[1, 0, 0] = np.nan

    with pytest.raises(NonFiniteScoreError, match="maps contain 1 NaN and 0 infinite"):
        pixel_auroc(masks, maps)


def test_invalid_labels_rejected():
    with pytest.raises(
        ValueError, match=r"only 0 \(normal\) and 1 \(anomalous\), got values \[2\]"
    ):
        auroc([0, 1, 2], [0.1, 0.2, 0.3])


def test_mismatched_shapes_rejected():
    with pytest.raises(ValueError, match="labels has shape"):
        auroc([0, 1, 1], [0.1, 0.2])


# ----------------------------------------------------------------------------------------
# evaluate


def test_evaluate_all_defined():
    masks, maps = _hand_worked_pixels()

    result = evaluate([1, 0], [0.9, 0.6], masks, maps)

    assert tuple(result.values) == METRIC_NAMES
    assert all(reason == "" for reason in result.reasons.values())
    assert result.values["image_auroc"] == 1.0
    assert result.values["pixel_auroc"] == pytest.approx(0.875)
    assert result.values["pixel_aupro"] == pytest.approx(0.175 / 0.3)


def test_evaluate_matches_single_functions():
    rng = np.random.default_rng(5)
    masks = _blob_masks(rng, n_images=5, size=16)
    maps = rng.random(masks.shape).astype(np.float32)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = rng.random(5)

    result = evaluate(labels, scores, masks, maps)

    assert result.values["image_auroc"] == auroc(labels, scores)
    assert result.values["image_ap"] == average_precision(labels, scores)
    assert result.values["image_f1_max"] == f1_max(labels, scores)
    assert result.values["pixel_auroc"] == pixel_auroc(masks, maps)
    assert result.values["pixel_ap"] == pixel_ap(masks, maps)
    assert result.values["pixel_f1_max"] == pixel_f1_max(masks, maps)
    assert result.values["pixel_aupro"] == aupro(masks, maps)


def test_evaluate_one_class_reason():
    result = evaluate([0, 0, 0], [0.1, 0.5, 0.2])

    assert math.isnan(result.values["image_auroc"])
    assert math.isnan(result.values["image_ap"])
    assert math.isnan(result.values["image_f1_max"])
    assert result.reasons["image_auroc"].startswith("test split has only one class")
    assert "all 3 images normal" in result.reasons["image_auroc"]


def test_evaluate_all_anomalous_ap_defined():
    result = evaluate([1, 1], [0.1, 0.5])

    assert math.isnan(result.values["image_auroc"])
    assert result.reasons["image_auroc"].startswith("test split has only one class")
    assert result.values["image_ap"] == 1.0
    assert result.reasons["image_ap"] == ""


def test_evaluate_no_masks_reason():
    result = evaluate([0, 1], [0.1, 0.5])

    for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"):
        assert math.isnan(result.values[name])
        assert result.reasons[name] == "dataset has no pixel masks"
    assert result.values["image_auroc"] == 1.0


def test_evaluate_no_maps_reason():
    masks, _ = _hand_worked_pixels()

    default = evaluate([1, 0], [0.9, 0.6], masks, None)
    custom = evaluate([1, 0], [0.9, 0.6], masks, None, map_reason="image-only baseline")

    assert math.isnan(default.values["pixel_aupro"])
    assert default.reasons["pixel_aupro"] == "method makes no anomaly map"
    assert custom.reasons["pixel_auroc"] == "image-only baseline"


def test_evaluate_no_anomalous_pixel_reason():
    masks = np.zeros((2, 4, 4), dtype=bool)
    maps = np.zeros((2, 4, 4), dtype=np.float32)

    result = evaluate([0, 1], [0.2, 0.7], masks, maps)

    assert result.reasons["pixel_auroc"] == "no anomalous pixel in the masks"
    assert math.isnan(result.values["pixel_aupro"])
    assert result.values["image_auroc"] == 1.0


def test_evaluate_non_finite_maps_recorded():
    masks, maps = _hand_worked_pixels()
    maps[0, 3, 3] = np.inf

    result = evaluate([1, 0], [0.9, 0.6], masks, maps)

    assert math.isnan(result.values["pixel_auroc"])
    assert "0 NaN and 1 infinite values" in result.reasons["pixel_auroc"]
    assert result.values["image_auroc"] == 1.0


def test_evaluate_non_finite_scores_recorded():
    masks, maps = _hand_worked_pixels()

    result = evaluate([1, 0], [np.nan, 0.6], masks, maps)

    assert math.isnan(result.values["image_auroc"])
    assert "1 NaN" in result.reasons["image_auroc"]
    assert result.values["pixel_auroc"] == pytest.approx(0.875)


def test_evaluate_image_count_mismatch_rejected():
    masks, maps = _hand_worked_pixels()

    with pytest.raises(ValueError, match="cover 2 images but labels has 3"):
        evaluate([1, 0, 0], [0.9, 0.6, 0.1], masks, maps)


def test_metric_names_higher_is_better():
    assert set(HIGHER_IS_BETTER) == set(METRIC_NAMES)
    assert all(HIGHER_IS_BETTER.values())


def test_pixel_metrics_memory_near_one_map_copy(monkeypatch):
    """Traced allocations stay below two copies of float32 maps: no float64 copy of all pixels."""
    monkeypatch.setattr(metrics, "_CHUNK_SIZE", 4096)
    rng = np.random.default_rng(6)
    masks = _blob_masks(rng, n_images=100, size=64)
    maps = rng.random(masks.shape, dtype=np.float32)

    tracemalloc.start()
    try:
        evaluate(masks.any(axis=(1, 2)).astype(int), maps.max(axis=(1, 2)), masks, maps)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 2 * maps.nbytes


def test_evaluate_empty_split_reason():
    result = evaluate([], [])

    assert math.isnan(result.values["image_auroc"])
    assert result.reasons["image_auroc"] == "test split is empty"
    assert result.reasons["pixel_auroc"] == "dataset has no pixel masks"
