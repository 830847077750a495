"""Bit-allocation programs against brute force on small instances, and their constraints."""

from __future__ import annotations

import itertools

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.quant.allocate import DROP, AllocationRules, PruneRules, SolverOptions, allocate, check_budget

WIDTHS = [2, 3, 4]


def synthetic(layers: int, experts: int, widths: list[int], seed: int) -> tuple[dict, dict]:
    """Costs falling with width (an expert-specific sensitivity), sizes = params x width."""
    gen = torch.Generator().manual_seed(seed)
    costs, sizes = {}, {}
    for layer in range(layers):
        sensitivity = torch.rand(experts, 1, generator=gen) + 0.1
        w = torch.tensor(widths, dtype=torch.float64)
        costs[layer] = sensitivity * torch.where(w == 0, torch.full_like(w, 40.0), 4.0 ** (-w)) * 100
        sizes[layer] = torch.ones(experts, 1, dtype=torch.float64) * w * 10
    return costs, sizes


def brute_force(costs: dict, sizes: dict, widths: list[int], budget: float, require_top: int = 0) -> float:
    layers = sorted(costs)
    experts = costs[layers[0]].shape[0]
    slots = [(layer, e) for layer in layers for e in range(experts)]
    best = float("inf")
    for combo in itertools.product(range(len(widths)), repeat=len(slots)):
        size = sum(float(sizes[layer][e, c]) for (layer, e), c in zip(slots, combo))
        if size > budget + 1e-9:
            continue
        ok = True
        for width in sorted(widths, reverse=True)[:require_top]:
            for layer in layers:
                if not any(c == widths.index(width) for (lay, _), c in zip(slots, combo) if lay == layer):
                    ok = False
        if ok:
            best = min(best, sum(float(costs[layer][e, c]) for (layer, e), c in zip(slots, combo)))
    return best


@pytest.mark.parametrize("solver", ["highs", "cbc"])
@pytest.mark.parametrize("require_top", [0, 1])
def test_global_program_matches_brute_force(solver: str, require_top: int) -> None:
    costs, sizes = synthetic(layers=2, experts=4, widths=WIDTHS, seed=require_top)
    budget = 2.5 * 10 * 8
    result = allocate(costs, sizes, WIDTHS, budget, rules=AllocationRules(scope="global", require_top=require_top),
                      solving=SolverOptions(name=solver))
    assert result.status == "optimal"
    assert result.solver == solver
    assert result.size <= budget + 1e-9
    assert result.objective == pytest.approx(brute_force(costs, sizes, WIDTHS, budget, require_top), rel=1e-6)


def test_require_top_keeps_an_expert_at_the_widest_width_per_layer() -> None:
    costs, sizes = synthetic(layers=3, experts=6, widths=WIDTHS, seed=5)
    result = allocate(costs, sizes, WIDTHS, 2.6 * 10 * 18, rules=AllocationRules(require_top=2))
    for layer in range(3):
        assert 4 in result.widths[layer] and 3 in result.widths[layer]


def test_per_layer_programs_meet_each_layers_budget() -> None:
    costs, sizes = synthetic(layers=3, experts=5, widths=WIDTHS, seed=2)
    costs[0] = costs[0] * 1000  # a very sensitive layer cannot borrow bits from the others
    result = allocate(costs, sizes, WIDTHS, 2.5 * 10 * 15, rules=AllocationRules(scope="layer", require_top=0))
    for layer in range(3):
        assert sum(result.widths[layer]) * 10 <= 2.5 * 10 * 5 + 1e-9
    global_result = allocate(costs, sizes, WIDTHS, 2.5 * 10 * 15, rules=AllocationRules(scope="global", require_top=0))
    assert sum(global_result.widths[0]) > sum(result.widths[0])  # the global program moves bits to layer 0


def test_uniform_per_layer_gives_one_width_per_layer() -> None:
    costs, sizes = synthetic(layers=4, experts=8, widths=[4, 8], seed=1)
    result = allocate(costs, sizes, [4, 8], 5.0 * 10 * 32, rules=AllocationRules(uniform_per_layer=True))
    widths = [set(result.widths[layer]) for layer in range(4)]
    assert all(len(w) == 1 for w in widths)
    assert sum(next(iter(w)) for w in widths) == 4 + 4 + 4 + 8  # 5.0 average allows one 8-bit layer


def test_budget_too_small_is_a_user_error() -> None:
    costs, sizes = synthetic(layers=1, experts=3, widths=WIDTHS, seed=0)
    with pytest.raises(MoecompressError, match="budget is too small"):
        allocate(costs, sizes, WIDTHS, 1.5 * 10 * 3)


def test_required_top_width_counts_in_the_early_budget_check() -> None:
    """All experts at 2 bits fits exactly, but one expert per layer must sit at 4 bits: refused before solving."""
    costs, sizes = synthetic(layers=2, experts=4, widths=WIDTHS, seed=0)
    with pytest.raises(MoecompressError, match=r"one per layer at 4 bits \(--require-top 1\)"):
        check_budget(sizes, WIDTHS, 2.0 * 10 * 4 * 2, require_top=1)
    check_budget(sizes, WIDTHS, 2.0 * 10 * 4 * 2, require_top=0)
    check_budget(sizes, WIDTHS, (2.0 * 10 * 3 + 4 * 10) * 2, require_top=1)  # exactly enough
    with pytest.raises(MoecompressError, match="budget is too small"):
        allocate(costs, sizes, WIDTHS, 2.0 * 10 * 4 * 2, rules=AllocationRules(require_top=1))


def test_joint_program_drops_the_same_number_per_layer_and_keeps_protected() -> None:
    widths = [DROP, 2, 3, 4]
    costs, sizes = synthetic(layers=3, experts=8, widths=widths, seed=3)
    costs[1][5, 0] = 0.0  # free to drop expert 5 of layer 1 ...
    rules = PruneRules(feasible_kept=tuple(range(2, 9)), protected={1: [5]})  # ... but it is protected
    result = allocate(costs, sizes, widths, 1.6 * 10 * 24, rules=AllocationRules(prune=rules, require_top=0))
    kept = [sum(1 for w in result.widths[layer] if w != DROP) for layer in range(3)]
    assert len(set(kept)) == 1 and kept[0] >= 2
    assert kept[0] < 8  # 1.6 average bits forces drops
    assert result.widths[1][5] != DROP


def test_joint_program_drops_equally_per_group() -> None:
    widths = [DROP, 2, 4]
    costs, sizes = synthetic(layers=2, experts=8, widths=widths, seed=4)
    rules = PruneRules(feasible_kept=(4, 6, 8), n_group=2)
    result = allocate(costs, sizes, widths, 1.5 * 10 * 16, rules=AllocationRules(prune=rules, require_top=0))
    for layer in range(2):
        first = sum(1 for w in result.widths[layer][:4] if w != DROP)
        second = sum(1 for w in result.widths[layer][4:] if w != DROP)
        assert first == second


def test_time_limited_solve_reports_its_status() -> None:
    costs, sizes = synthetic(layers=4, experts=32, widths=WIDTHS, seed=9)
    result = allocate(costs, sizes, WIDTHS, 2.5 * 10 * 128, solving=SolverOptions(time_limit=5.0, gap=0.0))
    assert result.status in ("optimal", "feasible")
    assert result.variables == 4 * 32 * 3
