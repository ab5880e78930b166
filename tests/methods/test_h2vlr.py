"""The H2VLR method end to end on the demo dataset with the tiny-test backbone."""

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from h2vlr.config import VARIANTS, H2VLRConfig, option_names
from h2vlr.data import get_dataset, sample_support
from h2vlr.features import FeatureCache, FeatureExtractor
from h2vlr.methods import FitContext, QueryBatch, create_method, list_methods
from h2vlr.methods.h2vlr import canonical_support_order

FAST = {"steps": 4, "n_views": 4}  # options that keep a fit well under a second


@pytest.fixture(scope="module")
def demo(tiny_backbone, tmp_path_factory):
    """Demo category data, its test features and an extractor, built once per module."""
    cache = tmp_path_factory.getbasetemp() / "h2vlr-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("H2VLR_CACHE_DIR", str(cache))
        data = get_dataset("demo").load_category(None, "metal_washer")
        extractor = FeatureExtractor(tiny_backbone, FeatureCache(cache / "features"))
        test = list(data.test)
        features = extractor.extract([sample.path for sample in test])
    return data, extractor, test, features


def fit_context(backbone, demo, shot=4, seed=0, order=None) -> FitContext:
    data, extractor, _, _ = demo
    support = sample_support(data, shot, seed)
    if order is not None:
        support = [support[i] for i in order]
    paths = [sample.path for sample in support]
    return FitContext(backbone, extractor, data.class_name, paths, extractor.extract(paths), seed)


def fit_and_score(backbone, demo, variant="full", options=None, **context):
    method = create_method("h2vlr", variant, options)
    stats = method.fit(fit_context(backbone, demo, **context))
    _, _, test, features = demo
    output = method.score(QueryBatch([sample.path for sample in test], features))
    return method, stats, output


def test_registered_with_every_variant():
    assert "h2vlr" in list_methods()
    method = create_method("h2vlr", "no-margin")
    assert method.config.loss == "bce"
    assert set(VARIANTS) == {
        "full",
        "no-dsi",
        "no-semantic-edges",
        "no-hsr",
        "pairwise-graph",
        "no-margin",
    }


def test_variant_overrides_set_options():
    method = create_method("h2vlr", "full+k_neighbors=1+attention=true", {"margin": 0.3})
    assert method.config.k_neighbors == 1
    assert method.config.attention is True
    assert method.config.margin == 0.3
    assert method.config.variant == "full"


def test_unknown_option_lists_valid_names():
    with pytest.raises(ValueError, match="unknown H2VLR option") as error:
        create_method("h2vlr", "full+neighbours=2")
    for name in ("steps", "k_neighbors", "hsr_layers", "margin", "spatial_size"):
        assert name in str(error.value)


def test_options_cover_required_settings():
    required = {
        "steps",
        "k_neighbors",
        "hsr_layers",
        "margin",
        "spatial_size",
        "semantic_members",
        "alpha",
        "sigma",
        "max_support_patches",
        "learning_rate",
        "n_views",
        "attention",
    }
    assert required <= set(option_names())
    assert "variant" not in option_names()


def test_invalid_option_value_names_it():
    with pytest.raises(ValueError, match="k_neighbors=0"):
        H2VLRConfig.from_variant("full", {"k_neighbors": 0})
    with pytest.raises(ValueError, match="alpha=1.5"):
        H2VLRConfig.from_variant("full", {"alpha": 1.5})
    with pytest.raises(ValueError, match="steps"):
        H2VLRConfig.from_variant("full", {"steps": 2.5})


def test_variants_differ_from_full_in_one_field():
    full = H2VLRConfig.from_variant("full")
    changed = {
        "no-dsi": "dynamic_prompts",
        "no-semantic-edges": "semantic_edges",
        "no-hsr": "reasoning",
        "pairwise-graph": "graph",
        "no-margin": "loss",
    }
    for variant, field in changed.items():
        config = H2VLRConfig.from_variant(variant)
        differing = {
            f.name
            for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(full, f.name)
        }
        assert differing == {"variant", field}, variant


def test_canonical_order_ignores_input_order(demo):
    data = demo[0]
    paths = [sample.path for sample in data.support_pool[:5]]
    order = canonical_support_order(paths)
    reordered = [paths[i] for i in order]
    shuffled = [paths[i] for i in (3, 1, 4, 0, 2)]
    assert [shuffled[i] for i in canonical_support_order(shuffled)] == reordered


@pytest.mark.slow
def test_support_shuffle_keeps_scores(tiny_backbone, demo):
    _, _, first = fit_and_score(tiny_backbone, demo, options=FAST, order=[0, 1, 2, 3])
    _, _, second = fit_and_score(tiny_backbone, demo, options=FAST, order=[2, 0, 3, 1])
    np.testing.assert_array_equal(first.image_scores, second.image_scores)
    np.testing.assert_array_equal(first.anomaly_maps, second.anomaly_maps)


@pytest.mark.slow
def test_same_job_twice_is_identical(tiny_backbone, demo):
    _, stats_a, first = fit_and_score(tiny_backbone, demo, options=FAST, seed=3)
    _, stats_b, second = fit_and_score(tiny_backbone, demo, options=FAST, seed=3)
    assert stats_a == stats_b
    np.testing.assert_array_equal(first.image_scores, second.image_scores)
    np.testing.assert_array_equal(first.anomaly_maps, second.anomaly_maps)
    _, _, other_seed = fit_and_score(tiny_backbone, demo, options=FAST, seed=4)
    assert not np.array_equal(first.image_scores, other_seed.image_scores)


@pytest.mark.slow
def test_backbone_stays_frozen(tiny_backbone, demo):
    before = {name: p.detach().clone() for name, p in tiny_backbone.model.named_parameters()}
    fit_and_score(tiny_backbone, demo, options=FAST)
    for name, parameter in tiny_backbone.model.named_parameters():
        assert not parameter.requires_grad, name
        assert parameter.grad is None, name
        assert torch.equal(parameter, before[name]), name


@pytest.mark.slow
def test_outputs_shapes_ranges_and_counts(tiny_backbone, demo):
    _, extractor, test, _ = demo
    views_before = extractor.stats.views_encoded
    encoded_before = extractor.stats.encoded
    options = {**FAST, "image_score_weight": 1.0}
    _, stats, output = fit_and_score(tiny_backbone, demo, options=options)

    size = tiny_backbone.image_size
    assert output.image_scores.shape == (len(test),)
    assert output.image_scores.dtype == np.float64
    assert output.anomaly_maps.shape == (len(test), size, size)
    assert output.anomaly_maps.dtype == np.float32
    assert output.anomaly_maps.min() >= 0.0
    assert output.anomaly_maps.max() <= 1.0
    # With the whole weight on the map, the image score is the map maximum.
    np.testing.assert_allclose(
        output.image_scores, output.anomaly_maps.reshape(len(test), -1).max(axis=1), rtol=1e-6
    )
    assert extractor.stats.views_encoded - views_before == FAST["n_views"]
    assert stats["views_encoded"] == FAST["n_views"]
    assert extractor.stats.encoded == encoded_before  # support features came from the cache


@pytest.mark.slow
def test_random_inputs_give_finite_scores(tiny_backbone, demo):
    data, extractor, _, _ = demo
    generator = torch.Generator().manual_seed(0)
    ctx = fit_context(tiny_backbone, demo)
    ctx.support_features = dataclasses.replace(
        ctx.support_features,
        global_embeds=torch.randn(4, 32, generator=generator) * 100,
        patch_tokens=torch.randn(4, 4, 64, 32, generator=generator) * 100,
    )
    method = create_method("h2vlr", "full+attention=true", FAST)
    stats = method.fit(ctx)
    assert np.isfinite(stats["loss_final"])

    queries = dataclasses.replace(
        ctx.support_features,
        global_embeds=torch.randn(3, 32, generator=generator),
        patch_tokens=torch.randn(3, 4, 64, 32, generator=generator) * 1e-3,
    )
    output = method.score(QueryBatch(ctx.support_paths[:3], queries))
    assert np.isfinite(output.image_scores).all()
    assert np.isfinite(output.anomaly_maps).all()


@pytest.mark.slow
def test_full_shot_support_uses_coreset(tiny_backbone, demo):
    options = {**FAST, "max_support_patches": 100}
    _, stats, output = fit_and_score(tiny_backbone, demo, options=options, shot="full")
    assert stats["support_patches"] == 100
    assert np.isfinite(output.image_scores).all()


@pytest.mark.slow
def test_training_loss_decreases(tiny_backbone, demo):
    # Per-step losses depend on the views drawn; the loss over every view does not.
    method, stats, _ = fit_and_score(tiny_backbone, demo)
    assert len(method.fit_losses) == H2VLRConfig().steps
    assert stats["train_loss_after"] < stats["train_loss_before"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_runs_end_to_end(tiny_backbone, demo, variant):
    method, stats, output = fit_and_score(tiny_backbone, demo, variant, FAST)
    _, _, test, _ = demo
    assert output.image_scores.shape == (len(test),)
    assert np.isfinite(output.image_scores).all()
    assert np.isfinite(output.anomaly_maps).all()
    assert stats["fit_steps"] == FAST["steps"]
    assert np.isfinite(stats["loss_final"])


@pytest.mark.slow
def test_fit_without_trainable_parameters_skips_steps(tiny_backbone, demo):
    # Static prompts and no reasoning (no variant combines them) leave nothing to train.
    method = create_method("h2vlr", "no-hsr")
    method.config = dataclasses.replace(method.config, dynamic_prompts=False)
    stats = method.fit(fit_context(tiny_backbone, demo))
    _, _, test, features = demo
    output = method.score(QueryBatch([sample.path for sample in test], features))
    assert stats["fit_steps"] == 0
    assert stats["views_encoded"] == 0
    assert np.isfinite(output.image_scores).all()


@pytest.mark.slow
def test_full_learns_on_demo(tiny_backbone, demo):
    # A sanity check that training and scoring work together, not a quality claim.
    _, _, test, _ = demo
    labels = [sample.label for sample in test]
    aurocs = []
    for seed in range(3):
        _, _, output = fit_and_score(tiny_backbone, demo, seed=seed)
        aurocs.append(roc_auc_score(labels, output.image_scores))
    assert np.mean(aurocs) > 0.7, aurocs


def test_score_before_fit_raises():
    method = create_method("h2vlr")
    with pytest.raises(RuntimeError, match="before fit"):
        method.score(QueryBatch([], None))
