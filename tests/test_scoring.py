"""Semantic probability, visual deviation, map and image score on hand-worked cases."""

import math

import torch
from torch.testing import assert_close

from h2vlr.scoring import (
    abnormal_probability,
    anomaly_maps_and_scores,
    best_similarities,
    visual_deviation,
)


def test_abnormal_probability_hand_case():
    similarity = torch.tensor([0.2, 0.1, 0.3, 0.0])  # two normal, two abnormal
    logits = [2.0, 1.0, 3.0, 0.0]  # scale 10
    total = sum(math.exp(value) for value in logits)
    expected = (math.exp(3.0) + math.exp(0.0)) / total
    assert_close(abnormal_probability(similarity, 2, 10.0), torch.tensor(expected))


def test_best_similarities_split_concepts():
    s_n, s_a = best_similarities(torch.tensor([[0.1, 0.4, 0.3, 0.2]]), num_normal=2)
    assert_close(s_n, torch.tensor([0.4]))
    assert_close(s_a, torch.tensor([0.3]))


def test_visual_deviation_hand_case():
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    support = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # Best cosines: 1, 0.8, -0.6 -> 1 - cos clipped to [0, 1].
    assert_close(visual_deviation(query, support), torch.tensor([0.0, 0.2, 1.0]))


def test_constant_scores_give_constant_maps():
    scores = torch.full((2, 16), 0.3)
    global_p = torch.tensor([0.1, 0.9])
    maps, image = anomaly_maps_and_scores(scores, global_p, (4, 4), 32, 4.0, 0.5)
    assert maps.shape == (2, 32, 32)
    assert_close(maps, torch.full((2, 32, 32), 0.3))
    assert_close(image, 0.5 * 0.3 + 0.5 * global_p)


def test_image_score_uses_map_maximum():
    scores = torch.zeros(1, 16)
    scores[0, 5] = 1.0
    maps, image = anomaly_maps_and_scores(scores, torch.tensor([0.0]), (4, 4), 16, 0.0, 1.0)
    assert_close(image, maps.flatten(1).max(dim=1).values)
    assert 0.0 < float(image) <= 1.0  # bilinear samples between patch centres stay below 1
