"""CAST's condition math on its own (no engine): similarity, direction, and the grid search."""

import pytest
import torch

from vllm_steer.errors import SteeringError
from vllm_steer.fit.cast import (
    ConditionPoint, best_condition_point, condition_direction, condition_similarity, f1_score,
)


def test_similarity_is_the_cosine_of_h_and_tanh_of_its_projection():
    v = torch.tensor([3.0, 4.0, 0.0])
    h = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 1.0]])
    u = v / 5.0
    for row, got in zip(h, condition_similarity(h, v)):
        projected = torch.tanh(torch.outer(u, u) @ row)  # P h with P = u uᵀ, written out
        want = torch.dot(row, projected) / (row.norm() * projected.norm()) if projected.norm() > 0 else 0.0
        assert float(got) == pytest.approx(float(want), abs=1e-6)


def test_direction_is_the_unit_mean_difference():
    present = torch.tensor([[2.0, 0.0], [4.0, 0.0]])
    absent = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    got = condition_direction(present, absent)
    want = torch.tensor([3.0, -1.0]) / torch.tensor([3.0, -1.0]).norm()
    torch.testing.assert_close(got, want)
    with pytest.raises(SteeringError, match="same mean"):
        condition_direction(present, present)


def test_f1_matches_its_definition():
    labels = torch.tensor([1, 1, 0, 0, 1]).bool()
    predicted = torch.tensor([1, 0, 1, 0, 1]).bool()  # tp 2, fp 1, fn 1
    assert f1_score(labels, predicted) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert f1_score(labels, torch.zeros(5, dtype=torch.bool)) == 0.0


def test_grid_picks_the_separating_layer_threshold_and_comparison_first_best_wins():
    labels = [1, 1, 1, 0, 0, 0]
    sims = {
        1: torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),  # carries nothing
        2: torch.tensor([0.10, 0.12, 0.15, 0.40, 0.45, 0.50]),  # present: below any of 0.16 .. 0.40
        3: torch.tensor([0.10, 0.12, 0.15, 0.40, 0.45, 0.50]),  # the same: layer 2 came first
    }
    point = best_condition_point(sims, labels)
    assert point == ConditionPoint(layer=2, threshold=0.16, comparison="below", f1=1.0)  # the first of them
    assert point.holds(sims[2]).tolist() == [True, True, True, False, False, False]
    above = best_condition_point({4: torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])}, labels)
    assert (above.comparison, above.threshold, above.f1) == ("above", 0.3, 1.0)
