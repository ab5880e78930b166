"""Support sampling, fixed support lists and the normal-image split rule."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from h2vlr.data import CategoryData, Sample, load_support_lists, sample_support
from h2vlr.data.splits import split_normals

ROOT = Path("/data/demo")


def _sample(rel: str, label: int = 0) -> Sample:
    defect = "good" if label == 0 else "crack"
    return Sample(ROOT / rel, rel, label, defect, None)


def _category(
    pool_size: int = 12, dataset: str = "mvtec", category: str = "bottle"
) -> CategoryData:
    pool = tuple(_sample(f"{category}/train/good/{i:03d}.png") for i in range(pool_size))
    test = (
        _sample(f"{category}/test/good/000.png"),
        _sample(f"{category}/test/crack/000.png", label=1),
    )
    return CategoryData(dataset, category, category, ROOT, pool, test, True)


def _rel(samples: list[Sample]) -> list[str]:
    return [s.rel_path for s in samples]


def test_sample_support_k_distinct_from_pool() -> None:
    data = _category()

    for shot in (1, 2, 4, 12):
        chosen = _rel(sample_support(data, shot, seed=3))
        assert len(chosen) == shot
        assert len(set(chosen)) == shot
        assert set(chosen) <= {s.rel_path for s in data.support_pool}


def test_sample_support_repeatable() -> None:
    data = _category()

    assert _rel(sample_support(data, 4, 7)) == _rel(sample_support(data, 4, 7))


def test_sample_support_one_shot_within_four_shot() -> None:
    data = _category()

    for seed in range(10):
        one = set(_rel(sample_support(data, 1, seed)))
        four = set(_rel(sample_support(data, 4, seed)))
        assert one <= four


def test_sample_support_ignores_pool_order() -> None:
    data = _category()
    shuffled = list(data.support_pool)
    random.Random(5).shuffle(shuffled)
    reordered = replace(data, support_pool=tuple(shuffled))

    for seed in range(5):
        assert _rel(sample_support(reordered, 4, seed)) == _rel(sample_support(data, 4, seed))


def test_sample_support_varies_with_seed_and_category() -> None:
    data = _category()
    other = _category(category="bottle2")

    by_seed = {tuple(sorted(_rel(sample_support(data, 4, seed)))) for seed in range(8)}
    names = [p.rsplit("/", 1)[1] for p in _rel(sample_support(data, 4, 0))]
    other_names = [p.rsplit("/", 1)[1] for p in _rel(sample_support(other, 4, 0))]

    assert len(by_seed) > 1
    assert names != other_names


def test_sample_support_matches_documented_rule() -> None:
    data = _category()

    def key(rel: str) -> str:
        return hashlib.sha256(f"mvtec\0bottle\0{11}\0{rel}".encode()).hexdigest()

    expected = sorted((s.rel_path for s in data.support_pool), key=key)[:4]

    assert _rel(sample_support(data, 4, 11)) == expected


def test_sample_support_same_in_other_process() -> None:
    data = _category()
    script = (
        "from pathlib import Path\n"
        "from h2vlr.data import CategoryData, Sample, sample_support\n"
        "r = Path('/data/demo')\n"
        "pool = tuple(Sample(r / f'bottle/train/good/{i:03d}.png', "
        "f'bottle/train/good/{i:03d}.png', 0, 'good', None) for i in range(12))\n"
        "data = CategoryData('mvtec', 'bottle', 'bottle', r, pool, (), True)\n"
        "print(','.join(s.rel_path for s in sample_support(data, 4, 2)))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}

    output = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()

    assert output.split(",") == _rel(sample_support(data, 4, 2))


def test_sample_support_full_is_whole_pool() -> None:
    data = _category()

    assert _rel(sample_support(data, "full", 0)) == _rel(list(data.support_pool))


def test_sample_support_too_many_names_sizes() -> None:
    data = _category(pool_size=3)

    with pytest.raises(ValueError, match=r"'bottle'.*contains 3 images.*k=4"):
        sample_support(data, 4, 0)


@pytest.mark.parametrize("shot", [0, -1, True, "4", 2.0])
def test_sample_support_invalid_shot(shot: object) -> None:
    with pytest.raises(ValueError, match="invalid shot"):
        sample_support(_category(), shot, 0)  # type: ignore[arg-type]


def test_sample_support_never_test_image() -> None:
    data = _category(pool_size=2)
    leaked = replace(data, test=data.test + (data.support_pool[0],))

    with pytest.raises(ValueError, match="also a test image"):
        sample_support(leaked, "full", 0)


def _write_lists(path: Path, lists: object) -> Path:
    path.write_text(json.dumps(lists))
    return path


def test_support_lists_replace_sampling(tmp_path: Path) -> None:
    data = _category()
    listed = ["bottle/train/good/007.png", "bottle/train/good/002.png"]
    path = _write_lists(tmp_path / "lists.json", {"mvtec": {"bottle": {"2": {"0": listed}}}})

    lists = load_support_lists(path)

    assert _rel(sample_support(data, 2, 0, lists)) == listed
    # No entry for seed 1: sampling takes over.
    assert _rel(sample_support(data, 2, 1, lists)) == _rel(sample_support(data, 2, 1))


def test_support_lists_file_not_in_pool(tmp_path: Path) -> None:
    data = _category()
    listed = ["bottle/test/good/000.png"]
    path = _write_lists(tmp_path / "lists.json", {"mvtec": {"bottle": {"1": {"0": listed}}}})

    with pytest.raises(ValueError, match=r"not in the support pool.*bottle/test/good/000.png"):
        sample_support(data, 1, 0, load_support_lists(path))


def test_support_lists_wrong_count(tmp_path: Path) -> None:
    data = _category()
    listed = ["bottle/train/good/000.png"]
    path = _write_lists(tmp_path / "lists.json", {"mvtec": {"bottle": {"2": {"0": listed}}}})

    with pytest.raises(ValueError, match="lists 1 images.*expected exactly 2"):
        sample_support(data, 2, 0, load_support_lists(path))


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ([], "top level"),
        ({"mvtec": {"bottle": {"zero": {"0": []}}}}, "mvtec/bottle/zero"),
        ({"mvtec": {"bottle": {"1": {"x": []}}}}, "mvtec/bottle/1/x"),
        ({"mvtec": {"bottle": {"1": {"0": "a.png"}}}}, "mvtec/bottle/1/0"),
        ({"mvtec": {"bottle": {"1": {"0": ["a.png", "a.png"]}}}}, "listed twice"),
    ],
)
def test_support_lists_invalid_structure(tmp_path: Path, content: object, where: str) -> None:
    path = _write_lists(tmp_path / "lists.json", content)

    with pytest.raises(ValueError, match=where):
        load_support_lists(path)


def test_support_lists_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "lists.json"
    path.write_text("{not json")

    with pytest.raises(ValueError, match="lists.json"):
        load_support_lists(path)


def test_split_normals_rule() -> None:
    normals = [_sample(f"no/img{i}.jpg") for i in range(11)]

    pool, test = split_normals(normals)

    by_hash = sorted(
        (s.rel_path for s in normals), key=lambda r: hashlib.sha256(r.encode()).hexdigest()
    )
    assert [s.rel_path for s in pool] == sorted(by_hash[:5])
    assert [s.rel_path for s in test] == sorted(by_hash[5:])


def test_split_normals_ignores_listing_order() -> None:
    normals = [_sample(f"no/img{i}.jpg") for i in range(20)]
    shuffled = list(normals)
    random.Random(1).shuffle(shuffled)

    assert split_normals(shuffled) == split_normals(normals)
