"""Neuron (atomic expert) selection: uniform width and global ranking with protection and feasibility."""

from __future__ import annotations

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.prune.neurons import check_neuron_ratio, select_neurons_global, select_neurons_uniform


def as_lists(selection):
    return {layer: [ids.tolist() for ids in per] for layer, per in selection.items()}


def test_uniform_width_keeps_each_experts_top_neurons() -> None:
    scores = {1: torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.0, 5.0, 5.0, 1.0]])}
    assert as_lists(select_neurons_uniform(scores, 0.5)) == {1: [[0, 2], [1, 2]]}
    assert as_lists(select_neurons_uniform(scores, 0.25)) == {1: [[0, 2, 3], [1, 2, 3]]}


def test_global_ranking_spans_layers_and_respects_min_width_and_protection() -> None:
    scores = {0: torch.tensor([[9.0, 8.0], [0.1, 0.2]]), 3: torch.tensor([[0.3, 7.0], [6.0, 0.4]])}
    # 8 neurons, remove 3: the lowest are 0.1, 0.2 (expert 0/1, but its best must stay) -> 0.1, 0.3, 0.4
    assert as_lists(select_neurons_global(scores, 3 / 8)) == {0: [[0, 1], [1]], 3: [[1], [0]]}
    # protecting layer 3 expert 0 keeps its 0.3: the next lowest is 8.0 (expert 0/0)
    assert as_lists(select_neurons_global(scores, 3 / 8, protected={3: [0]})) == {0: [[0], [1]], 3: [[0, 1], [0]]}
    with pytest.raises(MoecompressError, match=r"--ratio <= 0.5000"):
        select_neurons_global(scores, 0.75)


def test_ratio_checks() -> None:
    assert check_neuron_ratio(0.25, None) == 0.25
    with pytest.raises(MoecompressError, match="not --keep"):
        check_neuron_ratio(None, 4)
    with pytest.raises(MoecompressError, match=r"\[0, 1\)"):
        check_neuron_ratio(1.0, None)
