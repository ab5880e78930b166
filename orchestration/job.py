"""One benchmark job: sample the support set, fit the method, score the test split.

``run_job`` never raises for a problem of the job itself: any exception becomes a
``failed`` row that carries the exception text and the head of its traceback, so one
bad job cannot stop a run. Features are read through the shared ``FeatureCache``,
which the run's feature-extraction tasks filled beforehand; the job records how many
images it had to encode itself (0 when the cache was complete).

Shapes: ``B`` test images, ``S`` evaluation resolution.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from orchestration.planning import SHOT_FULL, JobSpec
from results.schema import METRIC_NAMES, STATUS_FAILED, STATUS_OK

if TYPE_CHECKING:
    from h2vlr.data import Sample
    from h2vlr.metrics import MetricResult

logger = logging.getLogger(__name__)

PIXEL_METRIC_NAMES = tuple(name for name in METRIC_NAMES if name.startswith("pixel_"))
SCORE_BATCH_SIZE = 32  # test images scored per method.score call
TRACEBACK_LINES = 12  # lines of a failed job's traceback kept in the jobs table
# Test hooks, all off unless this variable names a directory: a job exits its worker
# process once when <dir>/<job_id>.exit exists (the file is removed first), to exercise
# Ray's retry of dead workers; a job raises when <dir>/<job_id>.raise exists; and while
# <dir>/hold exists, only the first job to start runs and every other job waits, so a
# test can kill the driver with exactly one job done.
FAULT_DIR_ENV = "H2VLR_FAULT_DIR"
HOLD_TIMEOUT_SECONDS = 600.0

_BACKBONES: dict[tuple[str, str, int, str], Any] = {}  # one backbone per worker process


@dataclass(frozen=True)
class JobResult:
    """Rows of one job, ready for ``RunStore.write_job``."""

    job_row: dict[str, Any]  # one row of the jobs table
    score_rows: list[dict[str, Any]]  # one row of the scores table per test image


def get_backbone(backbone: str, pretrained: str, image_size: int, device: str):
    """Load a backbone once per worker process and reuse it for every later job."""
    from h2vlr.backbone import load_backbone

    key = (backbone, pretrained, image_size, device)
    if key not in _BACKBONES:
        logger.info("loading backbone %s (%s) on %s", backbone, pretrained, device)
        _BACKBONES[key] = load_backbone(backbone, pretrained, device=device, image_size=image_size)
    return _BACKBONES[key]


def run_job(spec: JobSpec, cache_dir: str | None) -> JobResult:
    """Run one job; every exception becomes a ``failed`` result instead of propagating."""
    started = datetime.now(UTC)
    try:
        return _run(spec, cache_dir, started)
    except Exception as exc:  # the job's failure is data, recorded in its row
        logger.exception("job %s failed", spec.job_id)
        return failed_result(spec, exc, started)


def _run(spec: JobSpec, cache_dir: str | None, started: datetime) -> JobResult:
    from h2vlr.data import get_dataset, load_support_lists, sample_support
    from h2vlr.features import FeatureCache, FeatureExtractor

    _wait_if_held(spec.job_id)
    backbone = get_backbone(spec.backbone, spec.pretrained, spec.image_size, spec.device)
    data = get_dataset(spec.dataset).load_category(Path(spec.data_root), spec.category)
    lists = load_support_lists(Path(spec.support_lists)) if spec.support_lists else None
    shot: int | str = spec.shot if spec.shot == SHOT_FULL else int(spec.shot)
    support = sample_support(data, shot, spec.seed, lists)
    extractor = FeatureExtractor(backbone, FeatureCache(Path(cache_dir) if cache_dir else None))

    fit_start = time.perf_counter()
    method, fit_stats = _fit(spec, backbone, extractor, data, [s.path for s in support])
    fit_seconds = time.perf_counter() - fit_start
    _exit_if_armed(spec.job_id)

    score_start = time.perf_counter()
    scores, maps, map_reason = _score(method, extractor, [s.path for s in data.test])
    score_seconds = time.perf_counter() - score_start
    metrics, pixel_images_excluded = evaluate_job(
        spec.job_id, backbone, data, scores, maps, map_reason
    )

    row = spec_columns(spec)
    row.update(
        n_support=len(support),
        status=STATUS_OK,
        error="",
        traceback="",
        n_test=len(data.test),
        n_test_anomalous=len(data.test_anomalous),
        pixel_images_excluded=pixel_images_excluded,
        support_files=[sample.rel_path for sample in support],
        fit_stats=json.dumps({k: float(v) for k, v in (fit_stats or {}).items()}, sort_keys=True),
        images_encoded=extractor.stats.encoded + extractor.stats.extra_computed,
        feature_cache_hits=extractor.stats.cache_hits + extractor.stats.extra_cache_hits,
        fit_seconds=fit_seconds,
        score_seconds=score_seconds,
        images_per_second=len(data.test) / score_seconds if score_seconds > 0 else float("nan"),
        device=str(backbone.device),
        started_at=started,
        finished_at=datetime.now(UTC),
    )
    for name in METRIC_NAMES:
        row[name] = float(metrics.values[name])
        row[f"{name}_reason"] = metrics.reasons.get(name, "")
    return JobResult(row, _score_rows(spec, len(support), data.test, scores))


def _fit(spec: JobSpec, backbone, extractor, data, support_paths: list[Path]):
    """Build the job's method and fit it on the support set; returns it and its fit stats.

    Support features come from the cache (the support images are pool images, which the
    feature task extracted).
    """
    from h2vlr.methods import FitContext, create_method

    _seed_everything(spec.seed)
    method = create_method(spec.method, spec.variant, spec.method_options())
    context = FitContext(
        backbone=backbone,
        extractor=extractor,
        class_name=data.class_name,
        support_paths=support_paths,
        support_features=extractor.extract(support_paths),
        seed=spec.seed,
        device=backbone.device,
    )
    return method, method.fit(context)


def _seed_everything(seed: int) -> None:
    # Methods derive their randomness from FitContext.seed; the global generators are
    # seeded too so that a library call that draws from them is reproducible as well.
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def _wait_if_held(job_id: str) -> None:
    fault_dir = os.environ.get(FAULT_DIR_ENV)
    if not fault_dir:
        return
    hold = Path(fault_dir) / "hold"
    if not hold.exists():
        return
    try:
        os.close(os.open(Path(fault_dir) / "hold.claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return  # this job claimed the single pass
    except FileExistsError:
        pass
    logger.warning("test hook: job %s waits while %s exists", job_id, hold)
    deadline = time.monotonic() + HOLD_TIMEOUT_SECONDS
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def _exit_if_armed(job_id: str) -> None:
    fault_dir = os.environ.get(FAULT_DIR_ENV)
    if not fault_dir:
        return
    if (Path(fault_dir) / f"{job_id}.raise").exists():
        raise RuntimeError(f"test hook: job {job_id} raises on request")
    marker = Path(fault_dir) / f"{job_id}.exit"
    if marker.exists():
        marker.unlink()
        logger.warning("test hook: exiting the worker in the middle of job %s", job_id)
        os._exit(1)


def _score(method, extractor, paths: list[Path]) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Score the test images in batches.

    Returns:
        Image scores ``[B]`` float64, anomaly maps ``[B, S, S]`` float32 or None, and
        the method's reason for having no maps.
    """
    from h2vlr.methods import QueryBatch

    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    map_reason = ""
    for start in range(0, len(paths), SCORE_BATCH_SIZE):
        batch_paths = paths[start : start + SCORE_BATCH_SIZE]
        output = method.score(QueryBatch(batch_paths, extractor.extract(batch_paths)))
        scores.append(np.asarray(output.image_scores, dtype=np.float64).reshape(-1))
        if output.anomaly_maps is None:
            map_reason = output.map_reason
        else:
            maps.append(np.asarray(output.anomaly_maps, dtype=np.float32))
    all_maps = np.concatenate(maps) if maps else None
    if all_maps is not None and all_maps.shape[0] != len(paths):
        raise RuntimeError(
            f"method returned anomaly maps for {all_maps.shape[0]} of {len(paths)} test images; "
            "a method must return maps for every batch or for none"
        )
    return np.concatenate(scores), all_maps, map_reason


@dataclass(frozen=True)
class PixelTruth:
    """Ground truth of the pixel metrics: which test images enter them, and their masks."""

    keep: np.ndarray  # [B] bool, test images that enter the pixel metrics
    masks: np.ndarray | None  # [K, S, S] bool masks of the kept images; None without masks
    n_excluded: int  # anomalous test images left out because their mask is missing


def pixel_truth(
    test: Sequence[Sample],
    has_masks: bool,
    image_size: int,
    preprocess_mask: Callable[[np.ndarray], np.ndarray],
) -> PixelTruth:
    """Build the masks of the pixel metrics, leaving out anomalous images without a mask.

    An empty mask for an anomalous image would count its defect pixels as normal, so
    such an image enters the image metrics only.

    Args:
        test: the ``B`` test samples.
        has_masks: the dataset provides pixel masks; otherwise every image is kept
            and ``masks`` is None.
        image_size: evaluation resolution ``S``.
        preprocess_mask: maps a bool ``[H, W]`` mask to a bool ``[S, S]`` one.

    Returns:
        A :class:`PixelTruth`; normal images get an all-false mask.
    """
    from h2vlr.data import load_mask

    if not has_masks:
        return PixelTruth(np.ones(len(test), dtype=bool), None, 0)
    keep = np.array([s.label == 0 or s.mask_path is not None for s in test], dtype=bool)
    kept_samples = [sample for sample, flag in zip(test, keep, strict=True) if flag]
    masks = np.zeros((len(kept_samples), image_size, image_size), dtype=bool)  # [K, S, S]
    for index, sample in enumerate(kept_samples):
        if sample.mask_path is not None:
            masks[index] = preprocess_mask(load_mask(sample.mask_path))
    return PixelTruth(keep, masks, int((~keep).sum()))


def evaluate_job(
    job_id: str, backbone, data, scores: np.ndarray, maps: np.ndarray | None, map_reason: str = ""
) -> tuple[MetricResult, int]:
    """Compute a job's metrics on its test split.

    Args:
        job_id: named in the warning about images without a mask.
        backbone: gives the resolution ``S`` and the mask preprocessing.
        data: the category; its ``test`` samples are the ``B`` scored images.
        scores: ``[B]`` image scores.
        maps: ``[B, S, S]`` anomaly maps, or None when the method makes none.
        map_reason: why ``maps`` is None.

    Returns:
        The ``MetricResult`` and the number of anomalous test images left out of the
        pixel metrics for want of a mask.
    """
    from h2vlr.metrics import MetricResult, evaluate

    labels = np.array([sample.label for sample in data.test], dtype=np.int64)  # [B]
    truth = pixel_truth(data.test, data.has_masks, backbone.image_size, backbone.preprocess_mask)
    if truth.n_excluded == 0:
        return evaluate(labels, scores, masks=truth.masks, maps=maps, map_reason=map_reason), 0
    logger.warning(
        "job %s: %d anomalous test images have no mask; they count in the image metrics "
        "but are left out of the pixel metrics",
        job_id,
        truth.n_excluded,
    )
    images = evaluate(labels, scores)
    kept_maps = maps[truth.keep] if maps is not None else None  # [K, S, S]
    pixels = evaluate(
        labels[truth.keep], scores[truth.keep], truth.masks, kept_maps, map_reason=map_reason
    )
    source = {name: pixels if name in PIXEL_METRIC_NAMES else images for name in METRIC_NAMES}
    merged = MetricResult(
        values={name: source[name].values[name] for name in METRIC_NAMES},
        reasons={name: source[name].reasons.get(name, "") for name in METRIC_NAMES},
    )
    return merged, truth.n_excluded


def _score_rows(spec: JobSpec, n_support: int, test, scores: np.ndarray) -> list[dict[str, Any]]:
    identity = _identity_columns(spec)
    return [
        {
            **identity,
            "n_support": n_support,
            "rel_path": sample.rel_path,
            "label": int(sample.label),
            "defect_type": sample.defect_type,
            "image_score": float(score),
        }
        for sample, score in zip(test, scores, strict=True)
    ]


def _identity_columns(spec: JobSpec) -> dict[str, Any]:
    """Return the columns that identify a job's setting in every table it writes."""
    return {
        "job_id": spec.job_id,
        "dataset": spec.dataset,
        "category": spec.category,
        "shot": spec.shot,
        "seed": spec.seed,
        "method": spec.method,
        "variant": spec.variant,
        "backbone": spec.backbone,
        "pretrained": spec.weights,
        "random_weights": spec.weights == "none",
        "image_size": spec.image_size,
    }


def spec_columns(spec: JobSpec) -> dict[str, Any]:
    """Return the spec and environment columns shared by ok and failed rows."""
    return {
        **_identity_columns(spec),
        "options": json.dumps(spec.method_options(), sort_keys=True),
        "config_hash": spec.config_hash,
        "host": socket.gethostname(),
        "versions": json.dumps(library_versions(), sort_keys=True),
    }


def failed_result(
    spec: JobSpec, exc: BaseException | str, started: datetime, tb: str = ""
) -> JobResult:
    """Build the ``failed`` row of a job from its exception (or an error text)."""
    if isinstance(exc, BaseException):
        error = f"{type(exc).__name__}: {exc}"
        tb = tb or "".join(traceback.format_exception(exc))
    else:
        error = exc
    row = spec_columns(spec)
    row.update(
        n_support=0,
        status=STATUS_FAILED,
        error=error,
        traceback="\n".join(tb.rstrip().splitlines()[-TRACEBACK_LINES:]),
        n_test=0,
        n_test_anomalous=0,
        pixel_images_excluded=0,
        support_files=[],
        fit_stats="{}",
        images_encoded=0,
        feature_cache_hits=0,
        fit_seconds=float("nan"),
        score_seconds=float("nan"),
        images_per_second=float("nan"),
        device=spec.device,
        started_at=started,
        finished_at=datetime.now(UTC),
    )
    for name in METRIC_NAMES:
        row[name] = float("nan")
        row[f"{name}_reason"] = "job failed"
    return JobResult(row, [])


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Return the versions of Python and the libraries that shape the results."""
    versions = {"python": platform.python_version()}
    for package in ("h2vlr-bench", "torch", "open_clip_torch", "torch_geometric", "numpy", "ray"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
