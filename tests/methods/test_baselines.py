"""Tests of the baselines clip-zeroshot, winclip, winclip-plus and patch-knn.

They run the real tiny-test backbone (random weights, 64 px, 8 x 8 patch grid) on the
procedural demo dataset, and compare against independent computations (scikit-learn
neighbours, hand-worked windows, a block-by-block transformer pass).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics.pairwise import cosine_distances
from sklearn.neighbors import NearestNeighbors

from h2vlr.data import get_dataset, load_mask, sample_support
from h2vlr.features import FeatureCache, FeatureExtractor, Features
from h2vlr.methods import FitContext, QueryBatch, ScoreOutput, create_method, list_methods
from h2vlr.methods.clip_zeroshot import NO_MAP_REASON
from h2vlr.methods.patch_knn import build_memory_bank
from h2vlr.methods.winclip import (
    PATCH_SCALE,
    encode_windows,
    harmonic_spread,
    parse_scales,
    reference_association,
    window_coverage,
    window_kind,
    window_patch_indices,
)
from h2vlr.metrics import evaluate
from h2vlr.registry import UnknownNameError

BASELINES = ("clip-zeroshot", "winclip", "winclip-plus", "patch-knn")
CATEGORY = "checkered_tile"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo category, generated under a fresh directory, with a 2-shot support set."""
    root = tmp_path_factory.mktemp("datasets") / "demo"
    data = get_dataset("demo").load_category(root, CATEGORY)
    support = [sample.path for sample in sample_support(data, 2, seed=0)]
    test = [sample.path for sample in data.test]
    return data, support, test


@pytest.fixture(scope="module")
def shared_extractor(tiny_backbone, tmp_path_factory):
    return FeatureExtractor(tiny_backbone, FeatureCache(tmp_path_factory.mktemp("features")))


def _fit_score(
    name: str,
    backbone,
    extractor: FeatureExtractor,
    class_name: str,
    support: list[Path],
    test: list[Path],
    variant: str = "full",
    seed: int = 0,
) -> ScoreOutput:
    """Run one method the way a job does: extract, fit on the support set, score the test set."""
    method = create_method(name, variant)
    method.fit(
        FitContext(
            backbone=backbone,
            extractor=extractor,
            class_name=class_name,
            support_paths=list(support),
            support_features=extractor.extract(support),
            seed=seed,
        )
    )
    return method.score(QueryBatch(paths=list(test), features=extractor.extract(test)))


def _fitted(name: str, backbone, extractor, support: list[Path], variant: str = "full"):
    method = create_method(name, variant)
    method.fit(
        FitContext(backbone, extractor, "checkered tile", support, extractor.extract(support), 0)
    )
    return method


# ----------------------------------------------------------------------------- registry


def test_registry_lists_all_methods():
    names = list_methods()
    for name in (*BASELINES, "h2vlr"):
        assert name in names


def test_unknown_method_lists_valid_names():
    with pytest.raises(UnknownNameError) as error:
        create_method("winclip-plus-plus")
    for name in BASELINES:
        assert name in str(error.value)


def test_unknown_variant_rejected():
    with pytest.raises(ValueError, match="valid: full"):
        create_method("patch-knn", "no-coreset")


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match="max_memory"):
        create_method("patch-knn", "full+neighbours=3")


def test_variant_overrides_options():
    assert create_method("winclip", "full+scales=3").config.scales == (3,)
    assert create_method("winclip", "full+scales=3,2").config.scales == (2, 3)
    assert create_method("patch-knn", "full+max_memory=50").config.max_memory == 50


def test_parse_scales_forms():
    assert parse_scales("2,3") == (2, 3)
    assert parse_scales(4) == (4,)
    assert parse_scales("none") == ()
    with pytest.raises(ValueError, match="2x"):
        parse_scales("2x")
    with pytest.raises(ValueError, match=">= 1"):
        parse_scales((0, 2))


def test_winclip_needs_a_scale():
    with pytest.raises(ValueError, match="at least one scale"):
        create_method("winclip", "full+scales=none+patch_scale=false")


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", BASELINES)
def test_scores_finite_with_right_shapes(name, tiny_backbone, shared_extractor, demo):
    data, support, test = demo
    output = _fit_score(name, tiny_backbone, shared_extractor, data.class_name, support, test)
    assert output.image_scores.shape == (len(test),)
    assert output.image_scores.dtype == np.float64
    assert np.isfinite(output.image_scores).all()
    if name == "clip-zeroshot":
        assert output.anomaly_maps is None
        assert output.map_reason == NO_MAP_REASON
    else:
        size = tiny_backbone.image_size
        assert output.anomaly_maps.shape == (len(test), size, size)
        assert output.anomaly_maps.dtype == np.float32
        assert np.isfinite(output.anomaly_maps).all()


def test_makes_maps_flags():
    assert create_method("clip-zeroshot").makes_maps is False
    assert create_method("winclip").uses_support is False
    assert create_method("winclip-plus").uses_support is True
    assert create_method("patch-knn").uses_support is True


def test_score_before_fit_raises(tiny_backbone, shared_extractor, demo):
    _, _, test = demo
    batch = QueryBatch(test[:1], shared_extractor.extract(test[:1]))
    for name in BASELINES:
        with pytest.raises(RuntimeError, match="before fit"):
            create_method(name).score(batch)


# ----------------------------------------------------------------------------- clip-zeroshot


def test_clip_zeroshot_matches_two_class_sigmoid(tiny_backbone, shared_extractor, demo):
    from h2vlr.prompt_ensemble import encode_class_prompts

    data, support, test = demo
    output = _fit_score(
        "clip-zeroshot", tiny_backbone, shared_extractor, data.class_name, support, test
    )
    # Softmax over two classes is the logistic function of the logit difference.
    embeds = shared_extractor.extract(test).global_embeds.double().numpy()
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    text = encode_class_prompts(tiny_backbone, data.class_name).double().numpy()
    scale = float(tiny_backbone.model.logit_scale.exp())
    difference = scale * (embeds @ text[1] - embeds @ text[0])
    np.testing.assert_allclose(output.image_scores, 1 / (1 + np.exp(-difference)), rtol=1e-5)


def test_clip_zeroshot_pixel_metrics_nan_with_reason(tiny_backbone, shared_extractor, demo):
    data, support, _ = demo
    test = [sample.path for sample in data.test]
    masks = np.stack(
        [
            tiny_backbone.preprocess_mask(load_mask(sample.mask_path))
            if sample.mask_path is not None
            else np.zeros((tiny_backbone.image_size,) * 2, dtype=bool)
            for sample in data.test
        ]
    )
    output = _fit_score(
        "clip-zeroshot", tiny_backbone, shared_extractor, data.class_name, support, test
    )

    labels = [sample.label for sample in data.test]
    result = evaluate(labels, output.image_scores, masks, output.anomaly_maps, output.map_reason)

    assert masks.any()
    assert np.isfinite(result.values["image_auroc"])
    for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"):
        assert np.isnan(result.values[name])
        assert result.reasons[name] == "method makes no anomaly map"


def test_clip_zeroshot_logit_scale_option(tiny_backbone, shared_extractor, demo):
    data, support, test = demo
    sharp = _fit_score(
        "clip-zeroshot",
        tiny_backbone,
        shared_extractor,
        data.class_name,
        support,
        test,
        variant="full+logit_scale=1000",
    )
    default = _fit_score(
        "clip-zeroshot", tiny_backbone, shared_extractor, data.class_name, support, test
    )
    # A higher inverse temperature pushes every probability away from 0.5.
    assert (np.abs(sharp.image_scores - 0.5) >= np.abs(default.image_scores - 0.5)).all()


# ----------------------------------------------------------------------------- windows


def test_window_patch_indices_on_3x3_grid():
    expected = torch.tensor([[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]])
    torch.testing.assert_close(window_patch_indices((3, 3), 2), expected)


def test_window_patch_indices_rectangular_grid():
    indices = window_patch_indices((2, 4), 2)
    assert indices.tolist() == [[0, 1, 4, 5], [1, 2, 5, 6], [2, 3, 6, 7]]


def test_window_scale_too_large_rejected():
    with pytest.raises(ValueError, match="1..3"):
        window_patch_indices((3, 5), 4)


def test_harmonic_spread_hand_worked():
    # Grid 2 x 3 with scale 2: window 0 covers patches 0 1 3 4, window 1 covers 1 2 4 5.
    coverage = window_coverage((2, 3), 2)
    scores = torch.tensor([[0.5, 0.25]])
    spread = harmonic_spread(scores, coverage)
    # Patches 1 and 4 lie in both windows: 2 / (1 / 0.5 + 1 / 0.25) = 1 / 3.
    expected = torch.tensor([[0.5, 1 / 3, 0.25, 0.5, 1 / 3, 0.25]])
    torch.testing.assert_close(spread, expected)


def test_harmonic_spread_zero_window_zeroes_its_patches():
    coverage = window_coverage((2, 3), 2)
    spread = harmonic_spread(torch.tensor([[0.0, 0.8]]), coverage)
    assert spread[0, [0, 1, 3, 4]].abs().max() < 1e-6
    torch.testing.assert_close(spread[0, [2, 5]], torch.tensor([0.8, 0.8]))


def _demo_pixels(backbone, paths: list[Path]) -> torch.Tensor:
    images = [Image.open(path).convert("RGB") for path in paths]
    return torch.stack([backbone.preprocess_image(image) for image in images])


def test_full_grid_window_is_global_embedding(tiny_backbone, demo):
    _, _, test = demo
    pixels = _demo_pixels(tiny_backbone, test[:3])
    grid = tiny_backbone.grid_size[0]
    windows = encode_windows(tiny_backbone, pixels, [grid])[f"window_{grid}"]
    global_embeds, _ = tiny_backbone.encode_images(pixels)
    assert windows.shape == (3, 1, tiny_backbone.embed_dim)
    torch.testing.assert_close(windows[:, 0], global_embeds, rtol=1e-4, atol=1e-5)


def _manual_window_embedding(backbone, pixels: torch.Tensor, patches: list[int]) -> torch.Tensor:
    """Run the class token and the given patches block by block through the image tower."""
    visual = backbone.model.visual
    with torch.no_grad():
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # [B, N, width]
        cls = visual.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x[:, [0, *[p + 1 for p in patches]]])
        for block in visual.transformer.resblocks:
            x = block(x)
        return visual.ln_post(x[:, 0]) @ visual.proj  # [B, D]


def test_window_embedding_matches_manual_pass(tiny_backbone, demo):
    _, _, test = demo
    pixels = _demo_pixels(tiny_backbone, test[:2])
    gw = tiny_backbone.grid_size[1]
    windows = encode_windows(tiny_backbone, pixels, [2, 3], window_batch=7)
    assert windows["window_2"].shape == (2, (gw - 1) ** 2, tiny_backbone.embed_dim)
    assert windows["window_3"].shape == (2, (gw - 2) ** 2, tiny_backbone.embed_dim)
    # Window at top-left patch (row 1, column 2) of the 2 x 2 scale.
    position = 1 * (gw - 1) + 2
    patches = [1 * gw + 2, 1 * gw + 3, 2 * gw + 2, 2 * gw + 3]
    expected = _manual_window_embedding(tiny_backbone, pixels, patches)
    torch.testing.assert_close(windows["window_2"][:, position], expected, rtol=1e-4, atol=1e-5)


def test_window_embedding_depends_on_own_patches_only(tiny_backbone, demo):
    _, _, test = demo
    pixels = _demo_pixels(tiny_backbone, test[:1])
    changed = pixels.clone()
    changed[..., 48:, 48:] = 0.0  # patches of rows and columns 6 and 7 of the 8 x 8 grid
    before = encode_windows(tiny_backbone, pixels, [2])["window_2"][0]
    after = encode_windows(tiny_backbone, changed, [2])["window_2"][0]
    torch.testing.assert_close(after[0], before[0])  # window over patches 0 1 8 9
    assert not torch.allclose(after[-1], before[-1])  # window over patches 54 55 62 63


# ----------------------------------------------------------------------------- winclip-plus


def test_reference_association_matches_sklearn():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 5, 6, generator=generator)
    references = torch.randn(7, 6, generator=generator)
    scores = reference_association(queries, references)
    expected = cosine_distances(queries.reshape(-1, 6).numpy(), references.numpy()).min(axis=1) / 2
    np.testing.assert_allclose(scores.reshape(-1).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_winclip_plus_zero_where_query_patch_equals_support(tiny_backbone, shared_extractor, demo):
    _, support, _ = demo
    method = _fitted("winclip-plus", tiny_backbone, shared_extractor, support[:1])
    references = method.scale_tokens(shared_extractor.extract(support[:1]), support[:1])

    grid = tiny_backbone.grid_size
    target = 2 * grid[1] + 3  # patch at row 2, column 3
    generator = torch.Generator().manual_seed(1)
    queries = {}
    for scale, tokens in references.items():
        query = torch.randn(tokens.shape, generator=generator)
        if scale == PATCH_SCALE:
            covering = torch.tensor([target])
        else:
            covering = (window_patch_indices(grid, scale) == target).any(dim=1).nonzero()[:, 0]
        query[:, covering] = tokens[:, covering]
        queries[scale] = query

    few_shot = method.few_shot_patch_scores(queries)[0]
    assert few_shot[target].abs() < 1e-5
    far = [0, grid[0] * grid[1] - 1]  # corner patches, covered by no copied window
    assert (few_shot[far] > 0.05).all()


def test_winclip_plus_self_support_halves_zero_shot(tiny_backbone, shared_extractor, demo):
    data, _, test = demo
    query = test[:3]
    plus = _fit_score(
        "winclip-plus", tiny_backbone, shared_extractor, data.class_name, query, query
    )
    zero = _fit_score("winclip", tiny_backbone, shared_extractor, data.class_name, query, query)
    # Every query token has itself among the references, so the few-shot part is 0.
    np.testing.assert_allclose(plus.image_scores, zero.image_scores / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plus.anomaly_maps, zero.anomaly_maps / 2, rtol=1e-4, atol=1e-6)


def test_winclip_scale_larger_than_grid_rejected(tiny_backbone, shared_extractor, demo):
    _, support, _ = demo
    with pytest.raises(ValueError, match="invalid window scale 9"):
        _fitted("winclip", tiny_backbone, shared_extractor, support, "full+scales=9")


# ----------------------------------------------------------------------------- patch-knn


def test_patch_knn_self_support_scores_zero(tiny_backbone, shared_extractor, demo):
    data, _, test = demo
    query = test[:2]
    output = _fit_score("patch-knn", tiny_backbone, shared_extractor, data.class_name, query, query)
    np.testing.assert_allclose(output.image_scores, 0.0, atol=1e-5)
    np.testing.assert_allclose(output.anomaly_maps, 0.0, atol=1e-5)


def test_patch_knn_matches_sklearn_neighbours(tiny_backbone):
    generator = torch.Generator().manual_seed(2)
    support = torch.randn(3, 2, 16, 8, generator=generator)  # [k, L, N, D]
    query = torch.randn(2, 2, 16, 8, generator=generator)
    method = create_method("patch-knn")
    method.fit(
        FitContext(
            backbone=tiny_backbone,
            extractor=None,
            class_name="tile",
            support_paths=[Path(f"s{i}.png") for i in range(3)],
            support_features=Features(torch.zeros(3, 8), support, (4, 4)),
            seed=0,
        )
    )
    scores = method.patch_scores(query)

    per_layer = []
    for layer in range(2):
        bank = support[:, layer].reshape(-1, 8).numpy()
        neighbours = NearestNeighbors(n_neighbors=1, metric="cosine").fit(bank)
        distance, _ = neighbours.kneighbors(query[:, layer].reshape(-1, 8).numpy())
        per_layer.append(distance[:, 0])
    expected = np.mean(per_layer, axis=0).reshape(2, 16)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_patch_knn_image_score_is_patch_maximum(tiny_backbone, shared_extractor, demo):
    data, support, test = demo
    method = _fitted("patch-knn", tiny_backbone, shared_extractor, support)
    features = shared_extractor.extract(test[:4])
    output = method.score(QueryBatch(test[:4], features))
    expected = method.patch_scores(features.patch_tokens).amax(dim=1).double().numpy()
    np.testing.assert_allclose(output.image_scores, expected)


def test_patch_knn_bank_limited_by_max_memory(tiny_backbone, shared_extractor, demo):
    _, support, _ = demo
    method = _fitted("patch-knn", tiny_backbone, shared_extractor, support, "full+max_memory=40")
    layers = len(tiny_backbone.identity.layers)
    assert method._bank.shape == (layers, 40, tiny_backbone.embed_dim)


def test_memory_bank_rows_are_support_tokens():
    tokens = torch.randn(2, 3, 10, 4, generator=torch.Generator().manual_seed(3))
    bank = build_memory_bank(tokens, max_memory=5, seed=0)
    pool = torch.nn.functional.normalize(tokens, dim=-1).permute(1, 0, 2, 3).reshape(3, 20, 4)
    for layer in range(3):
        for row in bank[layer]:
            assert (pool[layer] - row).abs().amax(dim=1).min() < 1e-6


def test_patch_knn_rejects_empty_support(tiny_backbone, shared_extractor):
    method = create_method("patch-knn")
    empty = shared_extractor.extract([])
    with pytest.raises(ValueError, match="at least one support image"):
        method.fit(FitContext(tiny_backbone, shared_extractor, "tile", [], empty, 0))


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize(
    ("name", "variant"),
    [("winclip-plus", "full"), ("patch-knn", "full"), ("patch-knn", "full+max_memory=30")],
)
def test_scores_ignore_support_order(name, variant, tiny_backbone, shared_extractor, demo):
    data, _, test = demo
    support = [sample.path for sample in sample_support(data, 4, seed=1)]
    args = (tiny_backbone, shared_extractor, data.class_name)
    forward = _fit_score(name, *args, support, test[:5], variant=variant)
    backward = _fit_score(name, *args, support[::-1], test[:5], variant=variant)
    np.testing.assert_array_equal(forward.image_scores, backward.image_scores)
    np.testing.assert_array_equal(forward.anomaly_maps, backward.anomaly_maps)


# h2vlr runs with one fit step: the step count does not change which images it encodes.
RUN_METHODS = [(name, "full") for name in BASELINES] + [("h2vlr", "full+steps=1")]


def test_methods_encode_each_image_once(tiny_backbone, demo, tmp_path):
    data, support, test = demo
    extractor = FeatureExtractor(tiny_backbone, FeatureCache(tmp_path / "cache"))
    for name, variant in RUN_METHODS:
        _fit_score(name, tiny_backbone, extractor, data.class_name, support, test, variant)

    images = len(set(support) | set(test))
    assert extractor.stats.encoded == images
    # Window embeddings: winclip needs the test images, winclip-plus adds the support set.
    assert extractor.stats.extra_computed == images
    assert extractor.stats.extra_cache_hits == len(test)

    # A second run on the same cache computes nothing.
    rerun = FeatureExtractor(tiny_backbone, FeatureCache(tmp_path / "cache"))
    for name, variant in RUN_METHODS:
        _fit_score(name, tiny_backbone, rerun, data.class_name, support, test, variant)
    assert rerun.stats.encoded == 0
    assert rerun.stats.extra_computed == 0


def test_window_cache_kind_names_scales():
    assert window_kind((2, 3)) == "winclip-windows:2,3"


def test_cache_extras_fills_window_cache(tiny_backbone, demo, tmp_path):
    data, support, test = demo
    paths = list(dict.fromkeys([*support, *test]))
    warm = FeatureExtractor(tiny_backbone, FeatureCache(tmp_path / "cache"))
    for name in ("winclip", "patch-knn"):
        create_method(name).cache_extras(tiny_backbone, warm, paths)
    assert warm.stats.extra_computed == len(paths)  # winclip only; patch-knn caches nothing

    jobs = FeatureExtractor(tiny_backbone, FeatureCache(tmp_path / "cache"))
    for name in ("winclip", "winclip-plus"):
        _fit_score(name, tiny_backbone, jobs, data.class_name, support, test, "full")
    assert jobs.stats.extra_computed == 0
    assert jobs.stats.extra_cache_hits > 0
