"""Tests of ``h2vlr-bench cache info`` and ``h2vlr-bench cache clear``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from h2vlr.features import FeatureCache, FeatureExtractor
from orchestration.cli_cache import app

runner = CliRunner()


@pytest.fixture
def filled_cache(tiny_backbone, tmp_path) -> FeatureCache:
    """A cache holding the features of three small random images."""
    rng = np.random.default_rng(3)
    paths = []
    for index in range(3):
        path = tmp_path / f"image_{index}.png"
        Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    cache = FeatureCache(tmp_path / "cache")
    FeatureExtractor(tiny_backbone, cache).extract(paths)
    return cache


def _entry_bytes(cache: FeatureCache) -> int:
    return sum(f.stat().st_size for f in cache.root.glob("*/*/*.safetensors"))


def test_info_json_counts_entries(filled_cache):
    result = runner.invoke(app, ["info", "--cache-dir", str(filled_cache.cache_dir), "--json"])

    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["entries"] == 3
    assert summary["bytes"] == _entry_bytes(filled_cache)
    assert summary["backbones"] == [
        {
            "model_name": "tiny-test",
            "weights": "none",
            "entries": 3,
            "bytes": _entry_bytes(filled_cache),
        }
    ]


def test_info_table_names_backbone(filled_cache):
    result = runner.invoke(app, ["info", "--cache-dir", str(filled_cache.cache_dir)])

    assert result.exit_code == 0, result.output
    assert "tiny-test" in result.output
    assert "total" in result.output


def test_info_uses_environment_default(filled_cache, monkeypatch):
    monkeypatch.setenv("H2VLR_CACHE_DIR", str(filled_cache.cache_dir))

    result = runner.invoke(app, ["info", "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["entries"] == 3


def test_info_empty_cache(tmp_path):
    result = runner.invoke(app, ["info", "--cache-dir", str(tmp_path / "none"), "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["entries"] == 0


def test_clear_declined_keeps_entries(filled_cache):
    result = runner.invoke(app, ["clear", "--cache-dir", str(filled_cache.cache_dir)], input="n\n")

    assert result.exit_code == 1
    assert "Delete 3 entries" in result.output
    assert sum(row.entries for row in filled_cache.usage()) == 3


def test_clear_confirmed_removes_entries(filled_cache):
    result = runner.invoke(app, ["clear", "--cache-dir", str(filled_cache.cache_dir)], input="y\n")

    assert result.exit_code == 0, result.output
    assert "Deleted 3 entries" in result.output
    assert filled_cache.usage() == []


def test_clear_yes_skips_prompt(filled_cache):
    result = runner.invoke(app, ["clear", "--cache-dir", str(filled_cache.cache_dir), "--yes"])

    assert result.exit_code == 0, result.output
    assert "Delete 3 entries" not in result.output
    assert filled_cache.usage() == []
    assert not filled_cache.root.exists()


def test_clear_empty_cache(tmp_path):
    result = runner.invoke(app, ["clear", "--cache-dir", str(tmp_path / "none")])

    assert result.exit_code == 0, result.output
    assert "nothing to delete" in result.output
