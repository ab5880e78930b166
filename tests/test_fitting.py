"""Alignment losses, patch labels and the step loop on hand-worked cases."""

import math

import pytest
import torch
from torch.testing import assert_close

from h2vlr.config import H2VLRConfig
from h2vlr.fitting import bce_loss, margin_loss, patch_labels, train


def test_margin_loss_hand_case():
    # Columns: one normal concept, one abnormal concept.
    similarity = torch.tensor([[0.5, 0.2], [0.3, 0.25], [0.1, 0.4], [0.3, 0.2]])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    # Hinges: 0, 0.2 - 0.05, 0, 0.2 + 0.1; class means 0.075 and 0.15.
    loss = margin_loss(similarity, labels, num_normal=1, margin=0.2)
    assert_close(loss, torch.tensor((0.075 + 0.15) / 2))


def test_margin_loss_uses_best_concept_per_side():
    similarity = torch.tensor([[0.1, 0.6, 0.5, 0.2]])  # normal: 0.1, 0.6; abnormal: 0.5, 0.2
    loss = margin_loss(similarity, torch.tensor([0.0]), num_normal=2, margin=0.3)
    assert_close(loss, torch.tensor(0.3 - (0.6 - 0.5)))


def test_margin_loss_single_class_batch():
    similarity = torch.tensor([[0.2, 0.3], [0.4, 0.1]])
    loss = margin_loss(similarity, torch.tensor([0.0, 0.0]), num_normal=1, margin=0.1)
    assert_close(loss, torch.tensor((0.2 + 0.0) / 2))


def test_bce_loss_hand_case():
    similarity = torch.tensor([[0.2, 0.1], [0.0, 0.3]])
    labels = torch.tensor([0.0, 1.0])
    p0 = math.exp(1.0) / (math.exp(2.0) + math.exp(1.0))  # p_abn of row 0 at scale 10
    p1 = math.exp(3.0) / (math.exp(0.0) + math.exp(3.0))
    expected = (-math.log(1 - p0) - math.log(p1)) / 2
    loss = bce_loss(similarity, labels, num_normal=1, scale=10.0)
    assert_close(loss, torch.tensor(expected))


def test_patch_labels_thresholds():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # top-left patch fully anomalous
    mask[0, 0, 3] = True  # one pixel (a quarter) of the top-right patch
    assert patch_labels(mask, (2, 2), 0.25).tolist() == [[1.0, 1.0, 0.0, 0.0]]
    assert patch_labels(mask, (2, 2), 0.5).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert patch_labels(mask, (2, 2), 0.0).tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_train_without_parameters_runs_no_step():
    losses = train([], lambda views: torch.tensor(1.0), 4, H2VLRConfig(), torch.Generator())
    assert losses == []


def test_train_reduces_a_quadratic():
    weight = torch.nn.Parameter(torch.tensor([3.0]))
    config = H2VLRConfig(steps=50, learning_rate=0.1)
    losses = train([weight], lambda views: weight.square().sum(), 4, config, torch.Generator())
    assert len(losses) == 50
    assert losses[-1] < losses[0]


def test_train_rejects_non_finite_loss():
    weight = torch.nn.Parameter(torch.tensor([1.0]))
    config = H2VLRConfig(steps=3)
    with pytest.raises(FloatingPointError, match="step 0"):
        train([weight], lambda views: weight.sum() * float("nan"), 4, config, torch.Generator())
