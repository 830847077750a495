"""Selection rules: top-k floor, groups, protected experts, global allocation, feasibility messages."""

from __future__ import annotations

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.prune.select import RoutingShape, feasible_counts, kept_count, select_global, select_uniform
from moecompress.prune.super_experts import find_super_experts


def test_kept_count_from_ratio_and_keep() -> None:
    shape = RoutingShape(num_experts=8, top_k=2)
    assert kept_count(shape, ratio=0.5) == 4
    assert kept_count(shape, ratio=0.25) == 6
    assert kept_count(shape, keep=3) == 3
    with pytest.raises(MoecompressError, match="top_k=2"):
        kept_count(shape, ratio=0.9)
    with pytest.raises(MoecompressError, match=r"\[0, 1\)"):
        kept_count(shape, ratio=1.0)
    with pytest.raises(MoecompressError, match="exactly one"):
        kept_count(shape, ratio=0.5, keep=2)


def test_group_rules_and_feasible_hint() -> None:
    shape = RoutingShape(num_experts=8, top_k=2, groups=(4, 2), min_kept_per_group=2)
    assert feasible_counts(shape) == [8]
    shape = RoutingShape(num_experts=16, top_k=2, groups=(4, 2), min_kept_per_group=2)
    assert feasible_counts(shape) == [8, 12, 16]
    with pytest.raises(MoecompressError, match="feasible counts: 8, 12, 16"):
        kept_count(shape, keep=6)


def test_select_uniform_keeps_top_scores_and_protected() -> None:
    shape = RoutingShape(num_experts=6, top_k=2)
    scores = {0: torch.tensor([5.0, 1.0, 4.0, 0.0, 3.0, 2.0]), 3: torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])}
    assert select_uniform(scores, shape, 3) == {0: [0, 2, 4], 3: [3, 4, 5]}
    assert select_uniform(scores, shape, 3, protected={0: [3]}) == {0: [0, 2, 3], 3: [3, 4, 5]}
    with pytest.raises(MoecompressError, match="protected super experts"):
        select_uniform(scores, shape, 2, protected={0: [1, 3, 5]})


def test_select_uniform_drops_equally_per_group() -> None:
    shape = RoutingShape(num_experts=8, top_k=2, groups=(2, 1), min_kept_per_group=2)
    scores = {0: torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0, 8.0, 7.0, 6.0])}
    assert select_uniform(scores, shape, 4) == {0: [2, 3, 4, 5]}


def test_select_global_normalises_per_layer_and_keeps_top_k() -> None:
    shape = RoutingShape(num_experts=4, top_k=1)
    scores = {0: torch.tensor([100.0, 100.0, 100.0, 100.0]), 1: torch.tensor([97.0, 1.0, 1.0, 1.0])}
    plan = select_global(scores, shape, 2)
    assert plan[1] == [0]  # layer 1 concentrates all its mass in one expert
    assert len(plan[0]) == 3 and sum(len(v) for v in plan.values()) == 4


def test_super_experts_rule() -> None:
    values = {layer: torch.ones(64) for layer in range(8)}
    values[1][7] = 50.0  # huge outlier early: super expert
    values[7][3] = 60.0  # outlier in the last 25% of layers: not counted
    found = find_super_experts(values, num_layers=8)
    assert found == {1: [7]}
    # the largest of ordinary maxima is no super expert: 4x the median is not a massive activation
    values = {layer: torch.ones(16) for layer in range(4)}
    values[0][2] = 4.0
    assert find_super_experts(values, num_layers=4) == {}
    values[0][2] = 10.5  # an order of magnitude above the median: protected
    assert find_super_experts(values, num_layers=4) == {0: [2]}
