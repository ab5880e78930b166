"""Image-level and pixel-level anomaly detection metrics, with a reason for every NaN.

Shapes: ``B`` test images, ``S`` evaluation resolution. Image metrics take ``labels``
``[B]`` (0 normal, 1 anomalous) and ``scores`` ``[B]``; pixel metrics take ``masks``
``[B, S, S]`` (non-zero is anomalous) and ``maps`` ``[B, S, S]``. Higher scores mean more
anomalous, and a sample counts as anomalous at threshold ``t`` when its score is ``>= t``.

Pixel metrics pool every pixel of every test image, normal images included. AUROC, AP
and F1-max come from one ranking of the scores: the anomalous and the normal scores are
sorted separately and walked together in chunks of distinct thresholds. So memory stays
near one float32 copy of the maps, plus sort indices and float64 region weights for the
anomalous pixels, without a float64 copy of the whole pixel set. The values are exact, with ties handled as scikit-learn's
``roc_auc_score``, ``average_precision_score`` and ``precision_recall_curve`` handle them.

Undefined metrics (one class in the test split, no masks, no map, no anomalous pixel)
are NaN. The public per-metric functions return NaN silently, and ``evaluate`` records
the reason next to each NaN. Non-finite scores are a bug in the method that produced
them: the per-metric functions raise ``NonFiniteScoreError``, while ``evaluate`` records
NaN with the count of bad values for the affected level (image or pixel) and logs a
warning, so the other level is still reported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
)
# For every metric of this module a higher value is better.
HIGHER_IS_BETTER: MappingProxyType[str, bool] = MappingProxyType(dict.fromkeys(METRIC_NAMES, True))

REASON_ONE_CLASS = "test split has only one class"
REASON_EMPTY_SPLIT = "test split is empty"
REASON_NO_MASKS = "dataset has no pixel masks"
REASON_NO_MAPS = "method makes no anomaly map"
REASON_NO_ANOMALOUS_PIXEL = "no anomalous pixel in the masks"
REASON_NO_NORMAL_PIXEL = "no normal pixel in the masks"

# Distinct thresholds walked per step. It bounds the temporary arrays to a few tens of MB.
_CHUNK_SIZE = 1 << 20
# 8-connectivity for the ground-truth regions of AUPRO.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class _Accumulator(Protocol):
    """A curve summary fed (true positives, false positives) at descending thresholds."""

    def update(self, true_pos: np.ndarray, false_pos: np.ndarray) -> None: ...

    def result(self) -> float: ...


class NonFiniteScoreError(ValueError):
    """Raised when scores or anomaly maps contain NaN or infinite values."""


@dataclass(frozen=True)
class MetricResult:
    """Every metric of one job, with the reason for each NaN."""

    values: dict[str, float]  # one entry per name in METRIC_NAMES; NaN where undefined
    reasons: dict[str, str] = field(default_factory=dict)  # "" where the value is defined


# ----------------------------------------------------------------------------------------
# Input checks


def _binary_labels(labels: np.ndarray | list[int], name: str) -> np.ndarray:
    """Return ``labels`` as a bool array, raising unless every value is 0 or 1."""
    array = np.asarray(labels)
    if array.dtype == np.bool_:
        return array
    invalid = np.unique(array[(array != 0) & (array != 1)])
    if invalid.size:
        raise ValueError(
            f"{name} must contain only 0 (normal) and 1 (anomalous), got values "
            f"{invalid[:5].tolist()}; map your labels to 0 and 1"
        )
    return array == 1


def _finite_scores(
    scores: np.ndarray | list[float], name: str, other_dtype: type = np.float64
) -> np.ndarray:
    """Return ``scores`` as float32 or float64, raising NonFiniteScoreError on NaN or inf.

    Arrays of another dtype are converted to ``other_dtype``; float32 and float64 are
    used as they are, without a copy.
    """
    array = np.asarray(scores)
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(other_dtype)
    message = _non_finite_message(array, name)
    if message:
        raise NonFiniteScoreError(message)
    return array


def _non_finite_message(array: np.ndarray, name: str) -> str:
    """Return a message counting the NaN and infinite values, or "" when all are finite."""
    if np.isfinite(array).all():
        return ""
    n_nan = int(np.count_nonzero(np.isnan(array)))
    n_inf = int(np.count_nonzero(np.isinf(array)))
    return (
        f"{name} contain {n_nan} NaN and {n_inf} infinite values out of {array.size}; "
        "the method that produced them must return finite scores"
    )


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} has shape {a.shape} but {names[1]} has shape {b.shape}; "
            "they must match element for element"
        )


def _check_pixel_shape(masks: np.ndarray) -> None:
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape [B, H, W], got shape {masks.shape}")


# ----------------------------------------------------------------------------------------
# Ranking: scores of the positive and negative samples, sorted, walked by threshold


@dataclass(frozen=True)
class _Ranking:
    """Sorted scores of the positives and negatives, with optional positive weights."""

    positives: np.ndarray  # [P] ascending scores of the anomalous samples
    negatives: np.ndarray  # [N] ascending scores of the normal samples
    # [P + 1] float64: cumulative weight of positives[:i], or None for unit weights
    weight_before: np.ndarray | None = None

    def thresholds_descending(self) -> Iterator[np.ndarray]:
        """Yield every distinct score once, in descending chunks of at most about 2 * _CHUNK_SIZE."""
        # Exclusive upper bound of the next chunk. It has the scores' dtype, because
        # np.searchsorted would copy a float32 array to float64 for a float64 bound.
        upper = self.negatives.dtype.type(np.inf)
        while True:
            n_pos = int(np.searchsorted(self.positives, upper, side="left"))
            n_neg = int(np.searchsorted(self.negatives, upper, side="left"))
            if n_pos == 0 and n_neg == 0:
                return
            pos_start = max(0, n_pos - _CHUNK_SIZE)
            neg_start = max(0, n_neg - _CHUNK_SIZE)
            # Each slice contains every score of its array above ``lower``, and ``lower``
            # is itself a slice value, so every distinct score in [lower, upper) is a candidate.
            lower = max(
                self.positives[pos_start] if pos_start > 0 else -np.inf,
                self.negatives[neg_start] if neg_start > 0 else -np.inf,
            )
            candidates = np.concatenate(
                [self.positives[pos_start:n_pos], self.negatives[neg_start:n_neg]]
            )
            yield np.unique(candidates[candidates >= lower])[::-1]
            if lower == -np.inf:
                return
            upper = lower

    def counts_at(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return true positive counts, false positive counts and positive weights at or above each threshold."""
        pos_below = np.searchsorted(self.positives, thresholds, side="left")
        neg_below = np.searchsorted(self.negatives, thresholds, side="left")
        true_pos = (self.positives.size - pos_below).astype(np.float64)
        false_pos = (self.negatives.size - neg_below).astype(np.float64)
        if self.weight_before is None:
            return true_pos, false_pos, true_pos
        weight = self.weight_before[-1] - self.weight_before[pos_below]
        return true_pos, false_pos, weight


def _rank(labels: np.ndarray, scores: np.ndarray) -> _Ranking:
    """Split flat scores by their bool labels and sort each side in place."""
    positives = scores[labels]
    negatives = scores[~labels]
    positives.sort()
    negatives.sort()
    return _Ranking(positives, negatives)


# ----------------------------------------------------------------------------------------
# Curve accumulators: fed (true positives, false positives) at descending thresholds


class _RocArea:
    """Area under the ROC curve by the trapezoidal rule, from the origin."""

    def __init__(self, n_pos: int, n_neg: int) -> None:
        self.n_pos, self.n_neg = n_pos, n_neg
        self.last_tp, self.last_fp = 0.0, 0.0
        self.twice_area = 0.0  # in units of one positive times one negative

    def update(self, true_pos: np.ndarray, false_pos: np.ndarray) -> None:
        tp = np.concatenate([[self.last_tp], true_pos])
        fp = np.concatenate([[self.last_fp], false_pos])
        self.twice_area += float(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
        self.last_tp, self.last_fp = float(tp[-1]), float(fp[-1])

    def result(self) -> float:
        return self.twice_area / (2.0 * self.n_pos * self.n_neg)


class _AveragePrecision:
    """Sum of precision times recall increment over descending thresholds (no interpolation)."""

    def __init__(self, n_pos: int) -> None:
        self.n_pos = n_pos
        self.last_tp = 0.0
        self.total = 0.0

    def update(self, true_pos: np.ndarray, false_pos: np.ndarray) -> None:
        tp_before = np.concatenate([[self.last_tp], true_pos[:-1]])
        precision = true_pos / (true_pos + false_pos)
        self.total += float(np.sum((true_pos - tp_before) * precision))
        self.last_tp = float(true_pos[-1])

    def result(self) -> float:
        return self.total / self.n_pos


class _F1Max:
    """Maximum of ``2 TP / (2 TP + FP + FN)`` over all thresholds."""

    def __init__(self, n_pos: int) -> None:
        self.n_pos = n_pos
        self.best = 0.0

    def update(self, true_pos: np.ndarray, false_pos: np.ndarray) -> None:
        f1 = 2.0 * true_pos / (true_pos + false_pos + self.n_pos)
        self.best = max(self.best, float(f1.max()))

    def result(self) -> float:
        return self.best


class _ProArea:
    """Area under the PRO curve up to a false positive rate limit, normalised by the limit."""

    def __init__(self, n_neg: int, fpr_limit: float) -> None:
        self.n_neg = n_neg
        self.fpr_limit = fpr_limit
        self.last_fpr, self.last_pro = 0.0, 0.0
        self.area = 0.0
        self.done = False

    def update(self, pro: np.ndarray, false_pos: np.ndarray) -> None:
        if self.done:
            return
        x = np.concatenate([[self.last_fpr], false_pos / self.n_neg])
        y = np.concatenate([[self.last_pro], pro])
        # FPR never decreases, so the segments inside the limit form a prefix.
        n_inside = int(np.searchsorted(x[1:], self.fpr_limit, side="right"))
        self.area += float(
            np.sum(np.diff(x[: n_inside + 1]) * (y[:n_inside] + y[1 : n_inside + 1]) / 2)
        )
        if n_inside < x.size - 1:
            self._add_partial_segment(x[n_inside : n_inside + 2], y[n_inside : n_inside + 2])
            return
        self.last_fpr, self.last_pro = float(x[-1]), float(y[-1])

    def _add_partial_segment(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add the trapezoid from ``x[0]`` to the limit, interpolating PRO linearly at the limit."""
        width = self.fpr_limit - x[0]
        pro_at_limit = y[0] + width * (y[1] - y[0]) / (x[1] - x[0])
        self.area += float(width * (y[0] + pro_at_limit) / 2)
        self.done = True

    def result(self) -> float:
        return self.area / self.fpr_limit


def _walk(
    ranking: _Ranking,
    curves: Sequence[_Accumulator],
    weighted: Sequence[_Accumulator] = (),
) -> None:
    """Feed every distinct threshold of ``ranking`` to the accumulators.

    ``curves`` get unit-weight true positives, ``weighted`` get weighted ones (PRO).
    """
    for thresholds in ranking.thresholds_descending():
        true_pos, false_pos, weight = ranking.counts_at(thresholds)
        for curve in curves:
            curve.update(true_pos, false_pos)
        for curve in weighted:
            curve.update(weight, false_pos)


# ----------------------------------------------------------------------------------------
# Image-level metrics


def _image_ranking(labels: np.ndarray | list[int], scores: np.ndarray | list[float]) -> _Ranking:
    label_array = _binary_labels(labels, "labels").ravel()
    score_array = _finite_scores(scores, "scores").ravel()
    _check_same_shape(label_array, score_array, ("labels", "scores"))
    return _rank(label_array, score_array)


def auroc(labels: np.ndarray | list[int], scores: np.ndarray | list[float]) -> float:
    """Return the area under the ROC curve; NaN unless both classes occur.

    Args:
        labels: ``[B]`` 0 normal, 1 anomalous.
        scores: ``[B]`` anomaly scores, higher is more anomalous.

    Raises:
        ValueError: on labels other than 0 and 1 or mismatched shapes.
        NonFiniteScoreError: on NaN or infinite scores.
    """
    ranking = _image_ranking(labels, scores)
    return _binary_results(ranking)[0]


def average_precision(labels: np.ndarray | list[int], scores: np.ndarray | list[float]) -> float:
    """Return the average precision (step-wise, as scikit-learn); NaN without anomalous samples.

    With anomalous but no normal samples the value is 1, as every threshold has precision 1.
    Arguments and errors are those of ``auroc``.
    """
    ranking = _image_ranking(labels, scores)
    return _binary_results(ranking)[1]


def f1_max(labels: np.ndarray | list[int], scores: np.ndarray | list[float]) -> float:
    """Return the best F1 score over all thresholds; NaN without anomalous samples.

    A sample is predicted anomalous when its score is at or above the threshold.
    Arguments and errors are those of ``auroc``.
    """
    ranking = _image_ranking(labels, scores)
    return _binary_results(ranking)[2]


# ----------------------------------------------------------------------------------------
# Pixel-level metrics


def _pixel_arrays(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return masks as bool and maps as float32 or float64, both ``[B, H, W]``, copying only if needed."""
    mask_array = np.asarray(masks)
    if mask_array.dtype != np.bool_:
        mask_array = mask_array != 0
    map_array = _finite_scores(maps, "maps", other_dtype=np.float32)
    _check_pixel_shape(mask_array)
    _check_same_shape(mask_array, map_array, ("masks", "maps"))
    return mask_array, map_array


def _pixel_ranking(masks: np.ndarray, maps: np.ndarray) -> _Ranking:
    mask_array, map_array = _pixel_arrays(masks, maps)
    return _rank(mask_array, map_array)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Return the AUROC over all pixels of all images; NaN unless both classes occur.

    Args:
        masks: ``[B, H, W]`` ground truth, non-zero is anomalous.
        maps: ``[B, H, W]`` anomaly maps, float32 preferred (float64 doubles the memory).

    Raises:
        ValueError: on mismatched or non-3-D shapes.
        NonFiniteScoreError: on NaN or infinite map values.
    """
    return _binary_results(_pixel_ranking(masks, maps))[0]


def pixel_ap(masks: np.ndarray, maps: np.ndarray) -> float:
    """Return the average precision over all pixels; arguments as ``pixel_auroc``."""
    return _binary_results(_pixel_ranking(masks, maps))[1]


def pixel_f1_max(masks: np.ndarray, maps: np.ndarray) -> float:
    """Return the best pixel F1 score over all thresholds; arguments as ``pixel_auroc``."""
    return _binary_results(_pixel_ranking(masks, maps))[2]


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Return the normalised area under the per-region overlap (PRO) curve.

    Each 8-connected component of each ground-truth mask is one region. At threshold
    ``t`` the PRO is the mean over all regions of the share of the region's pixels
    scoring ``>= t``, and the FPR is the share of normal pixels (over all images)
    scoring ``>= t``. The PRO curve over FPR, starting at the origin, is integrated
    exactly at every distinct score up to ``fpr_limit``, with PRO linearly interpolated
    at the limit, then divided by ``fpr_limit`` so that the value lies in [0, 1].

    Args:
        masks: ``[B, H, W]`` ground truth, non-zero is anomalous.
        maps: ``[B, H, W]`` anomaly maps.
        fpr_limit: false positive rate up to which the curve is integrated, in (0, 1].

    Returns:
        AUPRO in [0, 1]; NaN without an anomalous or without a normal pixel.

    Raises:
        ValueError: on a ``fpr_limit`` outside (0, 1] or mismatched shapes.
        NonFiniteScoreError: on NaN or infinite map values.
    """
    _check_fpr_limit(fpr_limit)
    mask_array, map_array = _pixel_arrays(masks, maps)
    ranking = _region_weighted_ranking(mask_array, map_array)
    if ranking.positives.size == 0 or ranking.negatives.size == 0:
        return float("nan")
    curve = _ProArea(ranking.negatives.size, fpr_limit)
    _walk(ranking, [], weighted=[curve])
    return curve.result()


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}; the usual value is 0.3")


def _region_weighted_ranking(masks: np.ndarray, maps: np.ndarray) -> _Ranking:
    """Rank pixels with each anomalous pixel weighted ``1 / (n_regions * region_size)``.

    The weights of all anomalous pixels sum to 1, so the weighted true positive count
    at a threshold is the PRO.
    """
    weights = _region_weights(masks)
    positives = maps[masks]
    order = np.argsort(positives, kind="stable")
    positives = positives[order]
    weight_before = np.concatenate([[0.0], np.cumsum(weights[order])])
    del order, weights

    negatives = maps[~masks]
    negatives.sort()
    return _Ranking(positives, negatives, weight_before)


def _region_weights(masks: np.ndarray) -> np.ndarray:
    """Return ``[P]`` float64 weights of the anomalous pixels in ``masks[masks]`` order."""
    per_image = []
    n_regions = 0
    for mask in masks:
        if not mask.any():
            continue
        regions, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        region_sizes = np.bincount(regions.ravel())
        per_image.append(1.0 / region_sizes[regions[mask]])
        n_regions += count
    if n_regions == 0:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(per_image) / n_regions


# ----------------------------------------------------------------------------------------
# All metrics of a job


def evaluate(
    labels: np.ndarray | list[int],
    scores: np.ndarray | list[float],
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    map_reason: str = "",
    fpr_limit: float = 0.3,
) -> MetricResult:
    """Compute every metric of ``METRIC_NAMES`` and the reason for each NaN.

    Args:
        labels: ``[B]`` 0 normal, 1 anomalous.
        scores: ``[B]`` image anomaly scores.
        masks: ``[B, S, S]`` ground truth, or None when the dataset has no pixel masks.
        maps: ``[B, S, S]`` anomaly maps, or None when the method makes none.
        map_reason: why ``maps`` is None, recorded for the pixel metrics; defaults to
            "method makes no anomaly map".
        fpr_limit: AUPRO integration limit.

    Returns:
        The values and reasons; a NaN never stops the other metrics.

    Raises:
        ValueError: on labels other than 0 and 1, mismatched shapes, or masks and maps
            covering a different number of images than ``labels``.
    """
    _check_fpr_limit(fpr_limit)
    values: dict[str, float] = {}
    reasons: dict[str, str] = {}
    _image_metrics(labels, scores, values, reasons)
    _pixel_metrics(masks, maps, len(np.asarray(labels)), map_reason, fpr_limit, values, reasons)
    return MetricResult(values=values, reasons=reasons)


def _record(
    values: dict[str, float],
    reasons: dict[str, str],
    names: list[str],
    results: list[float],
    reason: str,
) -> None:
    """Store results under ``names``; each one gets ``reason`` if NaN, else ""."""
    for name, value in zip(names, results, strict=True):
        values[name] = value
        reasons[name] = "" if not np.isnan(value) else reason


def _binary_results(ranking: _Ranking, pro: _ProArea | None = None) -> list[float]:
    """Return AUROC, AP, F1-max (and AUPRO when ``pro`` is given) from one walk, NaN where undefined.

    AUROC and AUPRO need both classes; AP and F1-max need anomalous samples only.
    """
    n_pos, n_neg = ranking.positives.size, ranking.negatives.size
    results = [float("nan")] * (3 if pro is None else 4)
    if n_pos == 0:
        return results
    curves = [_AveragePrecision(n_pos), _F1Max(n_pos)]
    roc = _RocArea(n_pos, n_neg) if n_neg else None
    weighted = [pro] if pro is not None and n_neg else []
    _walk(ranking, curves + ([roc] if roc else []), weighted=weighted)

    results[1], results[2] = curves[0].result(), curves[1].result()
    if roc is not None:
        results[0] = roc.result()
    if weighted:
        results[3] = pro.result()
    return results


def _image_metrics(
    labels: np.ndarray | list[int],
    scores: np.ndarray | list[float],
    values: dict[str, float],
    reasons: dict[str, str],
) -> None:
    names = ["image_auroc", "image_ap", "image_f1_max"]
    try:
        ranking = _image_ranking(labels, scores)
    except NonFiniteScoreError as error:
        logger.warning("image metrics are NaN: %s", error)
        _record(values, reasons, names, [float("nan")] * 3, str(error))
        return

    reason = ""
    n_pos, n_neg = ranking.positives.size, ranking.negatives.size
    if n_pos + n_neg == 0:
        reason = REASON_EMPTY_SPLIT
    elif n_pos == 0 or n_neg == 0:
        kind = "normal" if n_pos == 0 else "anomalous"
        reason = f"{REASON_ONE_CLASS} (all {n_pos + n_neg} images {kind})"
    _record(values, reasons, names, _binary_results(ranking), reason)


def _pixel_metrics(
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    n_images: int,
    map_reason: str,
    fpr_limit: float,
    values: dict[str, float],
    reasons: dict[str, str],
) -> None:
    names = ["pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"]
    nan_results = [float("nan")] * 4
    if masks is None:
        _record(values, reasons, names, nan_results, REASON_NO_MASKS)
        return
    if maps is None:
        _record(values, reasons, names, nan_results, map_reason or REASON_NO_MAPS)
        return

    try:
        mask_array, map_array = _pixel_arrays(masks, maps)
    except NonFiniteScoreError as error:
        logger.warning("pixel metrics are NaN: %s", error)
        _record(values, reasons, names, nan_results, str(error))
        return
    if mask_array.shape[0] != n_images:
        raise ValueError(
            f"masks and maps cover {mask_array.shape[0]} images but labels has {n_images}; "
            "pass one mask and one map per test image"
        )

    ranking = _region_weighted_ranking(mask_array, map_array)
    del map_array, mask_array
    reason = ""
    if ranking.positives.size == 0:
        reason = REASON_NO_ANOMALOUS_PIXEL
    elif ranking.negatives.size == 0:
        reason = REASON_NO_NORMAL_PIXEL
    results = _binary_results(ranking, _ProArea(ranking.negatives.size, fpr_limit))
    _record(values, reasons, names, results, reason)
