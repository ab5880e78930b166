"""Tests of the greedy k-center coreset."""

import pytest
import torch

from h2vlr.coreset import greedy_coreset


def _reference_k_center(points: torch.Tensor, n: int, first: int) -> list[int]:
    """Farthest-point selection from a full float64 distance matrix."""
    dist = torch.cdist(points.double(), points.double())  # [M, M]
    chosen = [first]
    while len(chosen) < n:
        to_nearest = dist[:, chosen].min(dim=1).values
        to_nearest[chosen] = -1.0
        chosen.append(int(torch.argmax(to_nearest)))
    return chosen


def test_coreset_hand_worked_line():
    # Points on a line at 0, 1, 2, 10, 11. From 0 the farthest is 11, then 2 lies
    # 2 from 0 and 9 from 11 while 10 lies 1 from 11, so 2 (at index 2) comes next.
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    seed = next(s for s in range(100) if int(greedy_coreset(points, 1, seed=s)[0]) == 0)
    assert greedy_coreset(points, 3, seed=seed).tolist() == [0, 4, 2]


def test_coreset_matches_brute_force():
    points = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    indices = greedy_coreset(points, 40, seed=5)
    expected = _reference_k_center(points, 40, first=int(indices[0]))
    assert indices.tolist() == expected


def test_coreset_covering_radius_beats_random_subset():
    points = torch.randn(500, 8, generator=torch.Generator().manual_seed(1))
    indices = greedy_coreset(points, 25, seed=0)
    radius = torch.cdist(points, points[indices]).min(dim=1).values.max()
    random_subset = torch.randperm(500, generator=torch.Generator().manual_seed(2))[:25]
    random_radius = torch.cdist(points, points[random_subset]).min(dim=1).values.max()
    assert radius < random_radius


def test_coreset_deterministic_per_seed():
    points = torch.randn(200, 4, generator=torch.Generator().manual_seed(3))
    first = greedy_coreset(points, 20, seed=7)
    second = greedy_coreset(points, 20, seed=7)
    torch.testing.assert_close(first, second)


def test_coreset_seed_changes_first_centre():
    points = torch.randn(200, 4, generator=torch.Generator().manual_seed(3))
    firsts = {int(greedy_coreset(points, 1, seed=seed)[0]) for seed in range(10)}
    assert len(firsts) > 1


def test_coreset_indices_unique_and_dtype():
    points = torch.randn(100, 3, generator=torch.Generator().manual_seed(4))
    indices = greedy_coreset(points, 60, seed=0)
    assert indices.dtype == torch.long
    assert indices.shape == (60,)
    assert len(set(indices.tolist())) == 60


def test_coreset_duplicates_still_unique():
    points = torch.zeros(6, 2)
    indices = greedy_coreset(points, 5, seed=0)
    assert len(set(indices.tolist())) == 5


@pytest.mark.parametrize("n", [10, 11, 50])
def test_coreset_keeps_all_when_n_at_least_pool(n):
    points = torch.randn(10, 3)
    torch.testing.assert_close(greedy_coreset(points, n), torch.arange(10))


def test_coreset_zero_size_is_empty():
    assert greedy_coreset(torch.randn(5, 2), 0).shape == (0,)


def test_coreset_rejects_negative_size():
    with pytest.raises(ValueError, match="-1"):
        greedy_coreset(torch.randn(5, 2), -1)


def test_coreset_rejects_patch_shaped_input():
    with pytest.raises(ValueError, match=r"\[M, D\]"):
        greedy_coreset(torch.randn(2, 5, 3), 4)
