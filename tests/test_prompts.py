"""Prompt learner: static ensemble, CoOp context initialisation, gradients, frozen text tower."""

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from h2vlr.features import Features
from h2vlr.prompt_ensemble import (
    ABNORMAL_STATE_GROUPS,
    NORMAL_STATE_GROUPS,
    encode_group_concepts,
    state_phrases,
)
from h2vlr.prompts import PromptLearner, encode_prompt_embeddings, support_statistics


def random_features(count: int, seed: int = 0) -> Features:
    generator = torch.Generator().manual_seed(seed)
    return Features(
        global_embeds=torch.randn(count, 32, generator=generator),
        patch_tokens=torch.randn(count, 4, 64, 32, generator=generator),
        grid_size=(8, 8),
    )


def test_static_mode_is_the_plain_ensemble(tiny_backbone):
    learner = PromptLearner(tiny_backbone, "metal washer", dynamic=False)
    concepts = learner(torch.zeros(64))

    normal = encode_group_concepts(tiny_backbone, NORMAL_STATE_GROUPS, "metal washer")
    abnormal = encode_group_concepts(tiny_backbone, ABNORMAL_STATE_GROUPS, "metal washer")
    assert_close(concepts, torch.cat([normal, abnormal]))
    assert learner.num_normal == 4
    assert list(learner.parameters()) == []


def test_initial_dynamic_concepts_equal_hand_prompts(tiny_backbone):
    # Context starts as the embedding of "a photo of a" and the meta-network shift as 0,
    # so the first concepts are those of the written prompts "a photo of a <state>.".
    torch.manual_seed(0)
    learner = PromptLearner(tiny_backbone, "metal washer", dynamic=True, n_context=4)
    concepts = learner(support_statistics(random_features(3)))

    groups = [
        *state_phrases(NORMAL_STATE_GROUPS, "metal washer").values(),
        *state_phrases(ABNORMAL_STATE_GROUPS, "metal washer").values(),
    ]
    expected = []
    for phrases in groups:
        prompts = [f"a photo of a {phrase}." for phrase in phrases]
        text = tiny_backbone.encode_text(tiny_backbone.tokenize(prompts))
        expected.append(F.normalize(F.normalize(text, dim=-1).mean(dim=0), dim=0))
    assert concepts.shape == (8, 32)
    assert_close(concepts, torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_gradients_reach_context_not_backbone(tiny_backbone):
    torch.manual_seed(0)
    learner = PromptLearner(tiny_backbone, "metal washer", dynamic=True, n_context=4)
    concepts = learner(support_statistics(random_features(2)))
    concepts[4:].sum().backward()

    assert learner.context.grad is not None
    assert learner.context.grad.abs().sum() > 0
    assert learner.meta_net[2].weight.grad.abs().sum() > 0
    for name, parameter in tiny_backbone.model.named_parameters():
        assert not parameter.requires_grad, name
        assert parameter.grad is None, name


def test_meta_network_shift_changes_concepts(tiny_backbone):
    torch.manual_seed(0)
    learner = PromptLearner(tiny_backbone, "metal washer", dynamic=True, n_context=4)
    torch.nn.init.normal_(learner.meta_net[2].weight, std=0.5)
    first = learner(support_statistics(random_features(2, seed=1)))
    second = learner(support_statistics(random_features(2, seed=2)))
    assert not torch.allclose(first, second)
    assert_close(first.norm(dim=-1), torch.ones(8))


def test_truncated_encoding_matches_full_context(tiny_backbone):
    token_ids = tiny_backbone.tokenize(["a photo of a flawless metal washer.", "broken washer."])
    embeds = tiny_backbone.token_embeddings(token_ids)
    full = tiny_backbone.encode_text_embeddings(embeds, token_ids)
    assert_close(encode_prompt_embeddings(tiny_backbone, embeds, token_ids), full)


def test_random_context_when_count_differs(tiny_backbone):
    torch.manual_seed(0)
    learner = PromptLearner(tiny_backbone, "metal washer", dynamic=True, n_context=2)
    concepts = learner(support_statistics(random_features(2)))
    assert learner.context.shape == (2, tiny_backbone.text_width)
    assert torch.isfinite(concepts).all()


def test_support_statistics_ignore_image_order():
    features = random_features(4)
    shuffled = features.index([2, 0, 3, 1])
    stats = support_statistics(features)
    assert stats.shape == (64,)
    assert_close(support_statistics(shuffled), stats)
