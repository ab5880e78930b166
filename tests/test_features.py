"""Tests of the content-addressed feature cache and the batched extractor."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from h2vlr.backbone import load_backbone
from h2vlr.features import (
    FeatureCache,
    FeatureExtractor,
    Features,
    cache_key,
    image_sha256,
)
from h2vlr.paths import default_cache_dir


@pytest.fixture
def image_paths(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(5):
        path = tmp_path / "images" / f"image_{index}.png"
        path.parent.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def cache(tmp_path) -> FeatureCache:
    return FeatureCache(tmp_path / "cache")


@pytest.fixture
def forward_counter(tiny_backbone):
    """Count calls of the visual patch embedding, one per batch passed to the image tower."""
    calls = []
    handle = tiny_backbone.model.visual.conv1.register_forward_hook(
        lambda module, inputs, output: calls.append(inputs[0].shape[0])
    )
    yield calls
    handle.remove()


def _expected_features(backbone, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.stack([backbone.preprocess_image(Image.open(p).convert("RGB")) for p in paths])
    global_embeds, patch_tokens = backbone.encode_images(pixels)
    return global_embeds.half().float(), patch_tokens.half().float()


def _entry_files(cache: FeatureCache) -> list[Path]:
    return sorted(cache.root.glob("*/*/*.safetensors"))


def test_extract_matches_backbone(tiny_backbone, cache, image_paths):
    extractor = FeatureExtractor(tiny_backbone, cache, batch_size=2)

    features = extractor.extract(image_paths)

    expected_global, expected_patches = _expected_features(tiny_backbone, image_paths)
    assert features.global_embeds.shape == (5, 32)
    assert features.patch_tokens.shape == (5, 4, 64, 32)
    assert features.grid_size == (8, 8)
    torch.testing.assert_close(features.global_embeds, expected_global, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(features.patch_tokens, expected_patches, rtol=1e-3, atol=1e-3)
    assert extractor.stats.encoded == 5
    assert extractor.stats.cache_hits == 0
    assert len(_entry_files(cache)) == 5


def test_cache_hit_skips_model(tiny_backbone, cache, image_paths, forward_counter):
    first = FeatureExtractor(tiny_backbone, cache, batch_size=2).extract(image_paths)
    assert forward_counter == [2, 2, 1]

    second_extractor = FeatureExtractor(tiny_backbone, cache, batch_size=2)
    second = second_extractor.extract(image_paths)

    assert forward_counter == [2, 2, 1]
    assert second_extractor.stats.encoded == 0
    assert second_extractor.stats.cache_hits == 5
    assert torch.equal(second.global_embeds, first.global_embeds)
    assert torch.equal(second.patch_tokens, first.patch_tokens)


def test_partial_hit_encodes_only_new(tiny_backbone, cache, image_paths, forward_counter):
    FeatureExtractor(tiny_backbone, cache).extract(image_paths[:2])
    forward_counter.clear()
    extractor = FeatureExtractor(tiny_backbone, cache)

    features = extractor.extract(list(reversed(image_paths)))

    assert forward_counter == [3]
    assert extractor.stats.encoded == 3
    assert extractor.stats.cache_hits == 2
    expected_global, _ = _expected_features(tiny_backbone, list(reversed(image_paths)))
    torch.testing.assert_close(features.global_embeds, expected_global, rtol=1e-3, atol=1e-3)


def test_same_bytes_share_entry(tiny_backbone, cache, image_paths, tmp_path):
    copy = tmp_path / "copy_of_image_0.png"
    shutil.copyfile(image_paths[0], copy)
    FeatureExtractor(tiny_backbone, cache).extract([image_paths[0]])
    extractor = FeatureExtractor(tiny_backbone, cache)

    extractor.extract([copy])

    assert extractor.stats.cache_hits == 1
    assert extractor.stats.encoded == 0


def test_key_depends_on_every_field(tiny_backbone, image_paths):
    identity = tiny_backbone.identity
    digest = image_sha256(image_paths[0])
    variants = [
        cache_key(identity, digest),
        cache_key(dataclasses.replace(identity, weights="file:/w.bin@sha256:ab"), digest),
        cache_key(dataclasses.replace(identity, layers=(2, 4)), digest),
        cache_key(dataclasses.replace(identity, image_size=96), digest),
        cache_key(dataclasses.replace(identity, preprocess_version="other"), digest),
        cache_key(dataclasses.replace(identity, model_name="ViT-B-16"), digest),
        cache_key(identity, image_sha256(image_paths[1])),
        cache_key(identity, digest, kind="winclip-windows:2,3"),
    ]

    assert len(set(variants)) == len(variants)
    assert cache_key(identity, digest) == variants[0]


def test_other_layers_miss_cache(tiny_backbone, cache, image_paths):
    FeatureExtractor(tiny_backbone, cache).extract(image_paths[:2])
    other = load_backbone("tiny-test", "none", device="cpu", layers=[2, 4])
    extractor = FeatureExtractor(other, cache)

    features = extractor.extract(image_paths[:2])

    assert extractor.stats.encoded == 2
    assert extractor.stats.cache_hits == 0
    assert features.patch_tokens.shape == (2, 2, 64, 32)


def test_truncated_entry_recomputed(tiny_backbone, cache, image_paths, caplog):
    original = FeatureExtractor(tiny_backbone, cache).extract(image_paths[:1])
    (entry,) = _entry_files(cache)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    extractor = FeatureExtractor(tiny_backbone, cache)

    with caplog.at_level(logging.WARNING, logger="h2vlr.features"):
        recomputed = extractor.extract(image_paths[:1])

    assert extractor.stats.encoded == 1
    assert extractor.stats.cache_hits == 0
    assert any(str(entry) in r.getMessage() for r in caplog.records)
    assert torch.equal(recomputed.patch_tokens, original.patch_tokens)
    reread = FeatureExtractor(tiny_backbone, cache)
    reread.extract(image_paths[:1])
    assert reread.stats.cache_hits == 1


@pytest.mark.parametrize("content", [b"", b"not safetensors at all"])
def test_garbage_entry_recomputed(tiny_backbone, cache, image_paths, content):
    FeatureExtractor(tiny_backbone, cache).extract(image_paths[:1])
    (entry,) = _entry_files(cache)
    entry.write_bytes(content)
    extractor = FeatureExtractor(tiny_backbone, cache)

    extractor.extract(image_paths[:1])

    assert extractor.stats.encoded == 1


def test_wrong_shape_entry_recomputed(tiny_backbone, cache, image_paths):
    identity = tiny_backbone.identity
    key = cache_key(identity, image_sha256(image_paths[0]))
    cache.save(identity, key, {"global_embeds": torch.zeros(32), "patch_tokens": torch.zeros(3)})
    extractor = FeatureExtractor(tiny_backbone, cache)

    features = extractor.extract(image_paths[:1])

    assert extractor.stats.encoded == 1
    assert features.patch_tokens.shape == (1, 4, 64, 32)


def test_entries_stored_as_float16(tiny_backbone, cache, image_paths):
    FeatureExtractor(tiny_backbone, cache).extract(image_paths[:1])
    identity = tiny_backbone.identity

    values = cache.load(identity, cache_key(identity, image_sha256(image_paths[0])))

    assert values is not None
    assert values["patch_tokens"].dtype == torch.float16
    assert values["patch_tokens"].shape == (4, 64, 32)
    assert not list(cache.root.rglob(".tmp-*"))


def test_concurrent_writers_leave_whole_entries(tiny_backbone, cache, image_paths):
    """Writers racing on one entry, as Ray workers do, never expose a partial file."""
    identity = tiny_backbone.identity
    key = cache_key(identity, image_sha256(image_paths[0]))
    versions = [
        {"global_embeds": torch.full((32,), float(i)), "patch_tokens": torch.full((4, 64, 32), i)}
        for i in range(4)
    ]
    reads: list[dict[str, torch.Tensor] | None] = []
    writers_done = threading.Event()

    def write(values: dict[str, torch.Tensor]) -> None:
        for _ in range(20):
            cache.save(identity, key, values)

    def read() -> None:
        while not writers_done.is_set():
            reads.append(cache.load(identity, key))

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(v,)) for v in versions]
    reader.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    writers_done.set()
    reader.join()

    first = next(i for i, values in enumerate(reads) if values is not None)
    loaded = reads[first:]
    # Writers rename complete files into place, so once an entry exists every read succeeds.
    assert all(values is not None for values in loaded)
    for values in loaded:
        value = float(values["global_embeds"][0])
        assert value in (0.0, 1.0, 2.0, 3.0)
        assert (values["patch_tokens"] == value).all()
    assert cache.load(identity, key) is not None
    assert not list(cache.root.rglob(".tmp-*"))


def test_default_cache_dir_without_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("H2VLR_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))

    assert default_cache_dir() == tmp_path / ".cache" / "h2vlr-bench"
    assert FeatureCache().root == tmp_path / ".cache" / "h2vlr-bench" / "features"


def test_without_cache_writes_nothing(tiny_backbone, tmp_path, image_paths):
    extractor = FeatureExtractor(tiny_backbone, None)

    extractor.extract(image_paths[:2])
    extractor.extract(image_paths[:2])

    assert extractor.stats.encoded == 4
    assert extractor.stats.cache_hits == 0
    assert not (tmp_path / "cache").exists()


def test_extract_extra_cached(tiny_backbone, cache, image_paths):
    calls = []

    def channel_means(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(pixels.shape[0])
        return {"means": pixels.mean(dim=(2, 3)), "ids": torch.arange(pixels.shape[0])}

    first = FeatureExtractor(tiny_backbone, cache, batch_size=4)
    values = first.extract_extra(image_paths, "channel-means", channel_means)
    second = FeatureExtractor(tiny_backbone, cache, batch_size=4)
    again = second.extract_extra(image_paths, "channel-means", channel_means)

    pixels = torch.stack([tiny_backbone.preprocess_image(Image.open(p)) for p in image_paths])
    assert calls == [4, 1]
    assert values["means"].shape == (5, 3)
    assert values["means"].dtype == torch.float32
    torch.testing.assert_close(values["means"], pixels.mean(dim=(2, 3)), rtol=1e-3, atol=1e-3)
    assert values["ids"].tolist() == [0, 1, 2, 3, 0]
    assert torch.equal(again["means"], values["means"])
    assert second.stats.extra_cache_hits == 5
    assert second.stats.extra_computed == 0
    assert second.stats.encoded == 0


def test_extract_extra_kind_in_key(tiny_backbone, cache, image_paths):
    extractor = FeatureExtractor(tiny_backbone, cache)

    def ones(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"value": torch.ones(pixels.shape[0])}

    extractor.extract_extra(image_paths[:2], "ones:1", ones)
    extractor.extract_extra(image_paths[:2], "ones:2", ones)

    assert extractor.stats.extra_computed == 4


def test_extract_extra_rejects_bad_output(tiny_backbone, cache, image_paths):
    extractor = FeatureExtractor(tiny_backbone, cache)

    with pytest.raises(ValueError, match="first dimension of 2"):
        extractor.extract_extra(image_paths[:2], "bad", lambda px: {"v": torch.zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
        extractor.extract_extra(image_paths[:2], "features", lambda px: {"v": px})


def test_encode_views_uncached(tiny_backbone, cache, image_paths):
    extractor = FeatureExtractor(tiny_backbone, cache, batch_size=2)
    images = [Image.open(p).convert("RGB") for p in image_paths[:3]]

    features = extractor.encode_views(images)

    assert features.patch_tokens.shape == (3, 4, 64, 32)
    assert extractor.stats.views_encoded == 3
    assert extractor.stats.encoded == 0
    assert not _entry_files(cache)


def test_features_index():
    features = Features(
        global_embeds=torch.arange(4.0)[:, None].expand(4, 2),
        patch_tokens=torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 3, 2),
        grid_size=(1, 3),
    )

    picked = features.index([3, 1])

    assert picked.global_embeds[:, 0].tolist() == [3.0, 1.0]
    assert picked.patch_tokens.shape == (2, 2, 3, 2)
    assert picked.patch_tokens[:, 0, 0, 0].tolist() == [3.0, 1.0]
    assert picked.grid_size == (1, 3)
    assert len(picked) == 2


def test_empty_paths(tiny_backbone, cache):
    features = FeatureExtractor(tiny_backbone, cache).extract([])

    assert features.global_embeds.shape == (0, 32)
    assert features.patch_tokens.shape == (0, 4, 64, 32)


def test_usage_and_clear(tiny_backbone, cache, image_paths):
    FeatureExtractor(tiny_backbone, cache).extract(image_paths[:3])
    other = load_backbone("tiny-test", "none", device="cpu", layers=[4])
    FeatureExtractor(other, cache).extract(image_paths[:2])

    (row,) = cache.usage()

    assert (row.model_name, row.weights, row.entries) == ("tiny-test", "none", 5)
    assert row.bytes == sum(f.stat().st_size for f in _entry_files(cache))
    removed = cache.clear()
    assert removed.entries == 5
    assert cache.usage() == []


def test_progress_bar_runs(tiny_backbone, cache, image_paths, capsys):
    extractor = FeatureExtractor(tiny_backbone, cache, batch_size=2, progress=True)

    features = extractor.extract(image_paths)

    output = capsys.readouterr().out
    assert len(features) == 5
    assert "5/5 images" in output
    assert "images/s" in output


MAGNETIC_TILE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "magnetic-tile"


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason=f"dataset not found at {MAGNETIC_TILE}")
def test_real_grayscale_image_and_mask(tiny_backbone, cache):
    image_path = sorted((MAGNETIC_TILE / "MT_Fray" / "Imgs").glob("*.jpg"))[0]
    mask = np.asarray(Image.open(image_path.with_suffix(".png"))) > 0
    extractor = FeatureExtractor(tiny_backbone, cache)

    features = extractor.extract([image_path])
    resized = tiny_backbone.preprocess_mask(mask)

    assert Image.open(image_path).mode == "L"
    assert features.patch_tokens.shape == (1, 4, 64, 32)
    assert torch.isfinite(features.patch_tokens).all()
    assert resized.shape == (64, 64)
    assert mask.any()
    assert resized.any()
    assert abs(resized.mean() - mask.mean()) < 0.05
