"""NAEE: subset search on hand-made error functions, and on a model with experts no token can reach."""

from __future__ import annotations

import torch

from moecompress.models.adapters import get_adapter
from moecompress.prune.reconstruction import block_inputs, block_output, reconstruction_error
from moecompress.prune.scorers import ScoringContext, get_scorer
from moecompress.prune.scorers.naee import count_subsets, exhaustive_subset, greedy_subset
from moecompress.prune.select import RoutingShape
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch
from tests.unit.prune.test_scorers import make_stats

# importance of each expert; dropping a set costs the sum of its importances, plus a penalty
# when experts 1 and 2 are both dropped (they back each other up)
IMPORTANCE = [5.0, 1.0, 1.2, 0.5, 3.0, 0.1]


def additive_error(subset: list[int]) -> float:
    dropped = set(range(len(IMPORTANCE))) - set(subset)
    return sum(IMPORTANCE[e] for e in dropped) + (10.0 if {1, 2} <= dropped else 0.0)


def test_exhaustive_finds_the_best_subset_by_hand() -> None:
    groups = [list(range(6))]
    # keep 3: dropping {3, 5} + one of {1, 2} -> drop 1 (cost 0.5 + 0.1 + 1.0 = 1.6)
    assert exhaustive_subset(additive_error, groups, 3, set()) == [0, 2, 4]
    # keep 2: dropping 1 and 2 together costs +10, so one of them stays: drop {1,3,4,5} = 4.6 beats
    # drop {2,3,4,5} = 4.8 and keeping 4 (drop {1,2,3,5} = 12.8) -> keep [0, 2]
    assert exhaustive_subset(additive_error, groups, 2, set()) == [0, 2]
    # protecting expert 5 forces it in: keep {0, 5} + x; x=2 drops {1,3,4} = 4.5, x=1: 4.7, x=4: 12.7
    assert exhaustive_subset(additive_error, groups, 3, {5}) == [0, 2, 5]


def test_greedy_removes_the_cheapest_expert_each_step() -> None:
    groups = [list(range(6))]
    kept, removed = greedy_subset(additive_error, groups, 3, set())
    assert removed == [5, 3, 1] and kept == [0, 2, 4]


def test_group_constraints_and_counts() -> None:
    groups = [[0, 1, 2], [3, 4, 5]]
    assert count_subsets(groups, 2, set()) == 9
    assert count_subsets(groups, 2, {0, 1}) == 3
    assert count_subsets(groups, 1, {0, 1}) == 0
    # one per group: group A keeps 2 (drop {0, 1} = 6.0 < drop {0, 2} = 6.2 < drop {1, 2} = 12.2), B keeps 4
    assert exhaustive_subset(additive_error, groups, 1, set()) == [2, 4]
    kept, removed = greedy_subset(additive_error, groups, 1, set())
    assert kept == [2, 4] and removed == [5, 3, 1, 0]


def test_naee_keeps_exactly_the_experts_tokens_can_reach() -> None:
    """GPT-OSS router with a -1e4 bias on experts 4-7: they are never chosen, so dropping them costs nothing
    and every other drop costs something: both searches must keep experts 0-3."""
    model = tiny_model(TINY_CONFIGS["gpt_oss"](), seed=0)
    adapter = get_adapter(model)
    with torch.no_grad():
        for ref in adapter.moe_layers(model):
            ref.router.bias[4:] = -1e4
    ids = token_batch(model.config.vocab_size, batch=2, length=16, seed=3)
    layers = [ref.index for ref in adapter.moe_layers(model)]
    stats = make_stats({"count": {"a": [1.0] * 8}}, {"a": 1}, num_experts=8)
    stats.header.moe_layers = layers
    context = ScoringContext(model, adapter, [("a", ids)], shape=RoutingShape(8, 2), keep=6, progress=False)
    for search in ("exhaustive", "greedy"):
        scores = get_scorer("naee").score(stats, {"search": search}, None, context)
        for layer in layers:
            kept = set(torch.nonzero(scores[layer] == 1.0).flatten().tolist())
            assert len(kept) == 6 and {0, 1, 2, 3} <= kept, (search, layer, scores[layer])
    # and the reconstruction error of that subset is exactly zero, any other is not
    for ref, tokens in block_inputs(model, adapter, [("a", ids)], progress=False):
        full = block_output(model, adapter, ref, tokens)
        assert reconstruction_error(full, block_output(model, adapter, ref, tokens, [0, 1, 2, 3])) == 0.0
        assert reconstruction_error(full, block_output(model, adapter, ref, tokens, [0, 1, 2, 4])) > 0.0
