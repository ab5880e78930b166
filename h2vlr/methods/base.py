"""The interface every anomaly detection method of the benchmark implements.

A job builds one method, calls ``fit`` once with the support set and then ``score``
on the test split. Shapes: ``B`` images, ``L`` feature layers, ``N`` patches, ``D``
embedding width, ``S`` evaluation resolution (the backbone's square input size).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from h2vlr.backbone import ClipBackbone
    from h2vlr.features import FeatureExtractor, Features


@dataclass
class FitContext:
    """Everything a method may use to adapt to one category from ``k`` normal images."""

    backbone: ClipBackbone
    extractor: FeatureExtractor
    class_name: str  # category words used in prompts, e.g. "magnetic tile"
    support_paths: list[Path]  # k normal images, in the order the sampler returned them
    support_features: Features  # features of support_paths, same order
    seed: int  # every random draw of the fit derives from this value
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class QueryBatch:
    """Test images to score, with their cached features."""

    paths: list[Path]
    features: Features


@dataclass
class ScoreOutput:
    """Scores of a query batch; higher means more anomalous."""

    image_scores: np.ndarray  # [B] float64
    anomaly_maps: np.ndarray | None  # [B, S, S] float32, or None for image-only methods
    map_reason: str = ""  # why anomaly_maps is None, recorded with the NaN pixel metrics


class AnomalyMethod(ABC):
    """Base class of the registered methods.

    Subclasses set ``name``, ``variants`` (the base variant names they accept; the
    first is the default) and ``makes_maps``, and accept keyword options from the
    run configuration in ``__init__``.
    """

    name: ClassVar[str]
    variants: ClassVar[tuple[str, ...]] = ("full",)
    makes_maps: ClassVar[bool] = True
    uses_support: ClassVar[bool] = True  # False for zero-shot methods

    def __init__(self, variant: str = "full", **options: Any) -> None:
        self.variant = variant
        self.options = options

    def cache_extras(
        self, backbone: ClipBackbone, extractor: FeatureExtractor, paths: list[Path]
    ) -> None:
        """Cache per-image computations beyond the shared features, before any job runs.

        The run's feature tasks call this for every image of a category, so that jobs
        find everything in the cache. The default caches nothing.
        """
        return None

    @abstractmethod
    def fit(self, ctx: FitContext) -> dict[str, float]:
        """Adapt to the support set; return fit statistics (for example the final loss)."""

    @abstractmethod
    def score(self, batch: QueryBatch) -> ScoreOutput:
        """Score test images; must not depend on the order of the support images."""
