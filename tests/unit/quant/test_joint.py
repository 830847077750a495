"""Drop costs of the joint program: pruning scores on the scale of the measured removal costs."""

from __future__ import annotations

import torch

from moecompress.compress.joint import drop_costs, joint_costs


def test_drop_costs_follow_scores_and_sum_to_the_measured_cost() -> None:
    scores = {3: torch.tensor([4.0, 1.0, 0.0, 5.0])}
    measured = {3: torch.tensor([2.0, 2.0, 3.0, 3.0])}
    costs = drop_costs(scores, measured)[3]
    assert float(costs.sum()) == 10.0
    assert torch.allclose(costs, torch.tensor([4.0, 1.0, 0.0, 5.0], dtype=torch.float64))


def test_zero_scores_share_the_cost_evenly_and_tables_put_drop_first() -> None:
    costs = drop_costs({0: torch.zeros(4)}, {0: torch.ones(4)})[0]
    assert torch.allclose(costs, torch.ones(4, dtype=torch.float64))
    table = joint_costs({0: torch.full((4, 3), 7.0)}, {0: costs})[0]
    assert table.shape == (4, 4) and torch.all(table[:, 0] == 1.0) and torch.all(table[:, 1:] == 7.0)
