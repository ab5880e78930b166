"""Support-set sampling and fixed support lists.

The support images of a job depend only on (dataset, category, shot, seed). Each pool
image gets the key ``SHA-256(dataset, category, seed, rel_path)``. Sorting the pool by
that key gives one seeded permutation per (dataset, category, seed), and a ``k``-shot
set is the first ``k`` images of it. So the 1-shot set of a seed is contained in its 4-shot
set, and neither process, job order nor directory listing order changes the draw.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from h2vlr.data.splits import stable_digest
from h2vlr.data.types import CategoryData, Sample

logger = logging.getLogger(__name__)

Shot = int | str  # a positive number of images, or "full" for the whole pool
FULL_SHOT = "full"


@dataclass(frozen=True)
class SupportLists:
    """Fixed support sets read from JSON: dataset -> category -> shot -> seed -> relative paths."""

    source: Path  # the JSON file, named in messages
    entries: Mapping[
        str, Mapping[str, Mapping[str, Mapping[str, tuple[str, ...]]]]
    ]  # keys as strings

    def lookup(self, dataset: str, category: str, shot: Shot, seed: int) -> tuple[str, ...] | None:
        """Return the listed relative paths for one job, or None when the file has no entry."""
        by_shot = self.entries.get(dataset, {}).get(category, {})
        return by_shot.get(str(shot), {}).get(str(seed))


def _shot_key_valid(key: str) -> bool:
    return key == FULL_SHOT or (key.isdigit() and int(key) > 0)


def _seed_key_valid(key: str) -> bool:
    return key.lstrip("-").isdigit()


def _invalid(source: Path, where: str, expected: str) -> ValueError:
    return ValueError(f"invalid support lists file {source}: at {where}, expected {expected}")


def _parse_paths(source: Path, where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(source, where, "a list of relative image paths (strings)")
    if len(set(value)) != len(value):
        raise _invalid(source, where, "distinct paths, but a path is listed twice")
    return tuple(value)


def _parse_level(source: Path, where: str, value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _invalid(source, where, f"an object keyed by {what}")
    return value


def load_support_lists(path: Path) -> SupportLists:
    """Read and validate a support lists JSON file.

    The file maps dataset -> category -> shot -> seed -> list of image paths relative to
    the data root, for example ``{"mvtec": {"bottle": {"1": {"0": ["bottle/train/good/000.png"]}}}}``.
    Shot keys are positive integers or ``"full"``; seed keys are integers.

    Raises:
        ValueError: The file is not valid JSON or does not have that structure.
    """
    source = Path(path)
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read support lists file {source}: {exc}") from exc

    entries: dict[str, dict[str, dict[str, dict[str, tuple[str, ...]]]]] = {}
    for dataset, categories in _parse_level(source, "top level", raw, "dataset").items():
        entries[dataset] = {}
        for category, shots in _parse_level(source, dataset, categories, "category").items():
            entries[dataset][category] = {}
            for shot, seeds in _parse_level(source, f"{dataset}/{category}", shots, "shot").items():
                where = f"{dataset}/{category}/{shot}"
                if not _shot_key_valid(shot):
                    raise _invalid(source, where, 'a shot key that is a positive integer or "full"')
                parsed: dict[str, tuple[str, ...]] = {}
                for seed, paths in _parse_level(source, where, seeds, "seed").items():
                    if not _seed_key_valid(seed):
                        raise _invalid(source, f"{where}/{seed}", "an integer seed key")
                    parsed[str(int(seed))] = _parse_paths(source, f"{where}/{seed}", paths)
                entries[dataset][category][shot] = parsed
    return SupportLists(source=source, entries=entries)


def _check_shot(data: CategoryData, shot: Shot) -> None:
    if shot == FULL_SHOT:
        return
    if isinstance(shot, bool) or not isinstance(shot, int) or shot < 1:
        raise ValueError(
            f"invalid shot {shot!r} for {data.dataset}/{data.category}; "
            'expected a positive integer or "full"'
        )
    if shot > len(data.support_pool):
        raise ValueError(
            f"cannot draw {shot} support images for category {data.category!r} of "
            f"{data.dataset!r}: its support pool contains {len(data.support_pool)} images "
            f"(k={shot}); choose a smaller shot or 'full'"
        )


def _listed_support(
    data: CategoryData, shot: Shot, listed: tuple[str, ...], source: Path
) -> list[Sample]:
    pool = {s.rel_path: s for s in data.support_pool}
    missing = [p for p in listed if p not in pool]
    if missing:
        raise ValueError(
            f"support lists file {source} names {len(missing)} images that are not in the "
            f"support pool of {data.dataset}/{data.category} (first: {missing[0]!r}); list "
            "paths relative to the data root, taken from the normal training images"
        )
    if shot != FULL_SHOT and len(listed) != shot:
        raise ValueError(
            f"support lists file {source} lists {len(listed)} images for "
            f"{data.dataset}/{data.category} shot {shot}; expected exactly {shot}"
        )
    return [pool[p] for p in listed]


def sample_support(
    data: CategoryData, shot: Shot, seed: int, support_lists: SupportLists | None = None
) -> list[Sample]:
    """Choose the support images of one job.

    Args:
        data: The category, with its support pool.
        shot: Number of images ``k``, or ``"full"`` for the whole pool.
        seed: Job seed; ignored for ``"full"``.
        support_lists: Fixed lists that replace sampling where they have an entry.

    Returns:
        ``k`` distinct normal images from ``data.support_pool``, in draw order
        (the whole pool sorted by ``rel_path`` for ``"full"``).

    Raises:
        ValueError: ``shot`` is invalid or larger than the pool, or a listed file is not
            in the pool.
    """
    _check_shot(data, shot)

    if support_lists is not None:
        listed = support_lists.lookup(data.dataset, data.category, shot, seed)
        if listed is not None:
            logger.info(
                "support for %s/%s shot %s seed %d from %s",
                data.dataset,
                data.category,
                shot,
                seed,
                support_lists.source,
            )
            chosen = _listed_support(data, shot, listed, support_lists.source)
            _check_not_test(data, chosen)
            return chosen
        logger.info(
            "%s has no entry for %s/%s shot %s seed %d; sampling instead",
            support_lists.source,
            data.dataset,
            data.category,
            shot,
            seed,
        )

    if shot == FULL_SHOT:
        chosen = list(data.support_pool)
    else:
        ranked = sorted(
            data.support_pool,
            key=lambda s: stable_digest(data.dataset, data.category, str(seed), s.rel_path),
        )
        chosen = ranked[:shot]
    _check_not_test(data, chosen)
    logger.debug(
        "support for %s/%s shot %s seed %d: %s",
        data.dataset,
        data.category,
        shot,
        seed,
        [s.rel_path for s in chosen],
    )
    return chosen


def _check_not_test(data: CategoryData, chosen: list[Sample]) -> None:
    test_paths = {s.rel_path for s in data.test}
    leaked = [s.rel_path for s in chosen if s.rel_path in test_paths]
    if leaked:
        raise ValueError(
            f"support image {leaked[0]!r} of {data.dataset}/{data.category} is also a test "
            "image; the support pool and the test split must be disjoint"
        )
