"""Bit allocation: one integer program chooses a width (or "drop") for every routed expert.

Multiple-choice knapsack, solved with PuLP (HiGHS through highspy, CBC as the fall-back):

    min   sum_{l,i,b} c_{l,i,b} x_{l,i,b}
    s.t.  sum_b x_{l,i,b} = 1                        every expert takes exactly one choice
          sum_{l,i,b} s_{l,i,b} x_{l,i,b} <= S       size budget (average bits x weights, or bytes)
          sum_i x_{l,i,top_j} >= 1  (j < require_top) each layer keeps an expert at the top widths
          x binary

* MC-MoE PMQ (Mixture Compressor for MoE LLMs Gains More, arXiv 2410.06270) solves one such
  program per layer (`scope="layer"`, the budget split by layer size); GEMQ (Global
  Expert-Level Mixed-Precision Quantization for MoE LLMs) solves one global program over all
  layers (`scope="global"`). The reference implementations use Gurobi.
* `uniform_per_layer`: every expert of a layer takes the same width (one variable per
  layer), for runtimes that cannot mix bits inside one MoE layer (vLLM: 4 or 8 bits).
* Joint pruning and quantisation: width 0 means "drop the expert" (size 0, cost = its
  normalised pruning cost). Stock configs hold one expert count, so every layer keeps the
  same number K of experts, with K chosen by the program among the router's feasible
  counts (>= top_k; equal per group for group-limited routers); protected experts are never
  dropped.

HiGHS stopped at a time limit still makes PuLP report "Optimal": the status here comes from
`prob.sol_status` (optimal, or feasible with the reached gap).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moecompress.errors import MoecompressError

log = logging.getLogger(__name__)

DROP = 0  # the "width" of a dropped expert in joint programs


@dataclass(frozen=True)
class PruneRules:
    """Feasibility rules of joint pruning: kept counts the router supports, protected experts."""

    feasible_kept: tuple[int, ...]  # experts kept per layer that the router can express (>= top_k)
    n_group: int = 1  # drops are equal per group for group-limited routers
    protected: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts never dropped


@dataclass
class Allocation:
    """The solved program: a width per expert (0 = dropped), with how it was solved."""

    widths: dict[int, list[int]]  # layer -> (E,) chosen width per expert
    objective: float
    size: float  # sum of chosen sizes (same unit as the budget)
    budget: float
    status: str  # "optimal" or "feasible"
    gap: float | None  # relative MIP gap when reported by the solver
    solver: str
    seconds: float
    variables: int

    def histogram(self, layer: int) -> dict[int, int]:
        """Experts per width in one layer."""
        counts: dict[int, int] = {}
        for width in self.widths[layer]:
            counts[width] = counts.get(width, 0) + 1
        return dict(sorted(counts.items()))


def _solver(name: str, time_limit: float, gap: float | None, threads: int | None):  # noqa: ANN202
    import pulp

    if name in ("highs", "auto"):
        try:
            import highspy  # noqa: F401

            return pulp.HiGHS(msg=bool(int(__import__("os").environ.get("MOECOMPRESS_SOLVER_LOG", "0"))), timeLimit=time_limit, gapRel=gap, threads=threads), "highs"
        except ImportError:
            if name == "highs":
                log.warning("highspy is not installed; solving with CBC")
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap, threads=threads), "cbc"


@dataclass(frozen=True)
class AllocationRules:
    """What the program must respect besides the budget: its scope and the rules on widths and drops."""

    scope: str = "global"  # "global": one program; "layer": one per layer, the budget split by size
    require_top: int = 1  # each layer keeps an expert at each of its `require_top` widest widths
    uniform_per_layer: bool = False  # one width per layer (ignores require_top)
    prune: PruneRules | None = None  # given exactly when the widths contain 0 (drop)


@dataclass(frozen=True)
class SolverOptions:
    """How the program is solved: the solver (`auto`: HiGHS when installed, else CBC), time and gap bounds."""

    name: str = "auto"  # auto | highs | cbc
    time_limit: float = 120.0  # seconds
    gap: float | None = None  # relative optimality gap at which to stop
    threads: int | None = None


def allocate(costs: dict[int, torch.Tensor], sizes: dict[int, torch.Tensor], widths: Sequence[int], budget: float,
             rules: AllocationRules | None = None, solving: SolverOptions | None = None) -> Allocation:
    """Choose a width per expert minimising total cost under the size budget.

    costs[l], sizes[l]: (E, C) cost and size of each choice (column c = widths[c]).
    budget: total size allowed (for scope "layer" it is split by each layer's share of the
    size at the widest choice). rules.require_top: each layer keeps at least one expert at each
    of its `require_top` widest widths (ignored with uniform_per_layer). rules.prune: rules that
    must be given when widths contain 0 (drop). solving.time_limit (s) and solving.gap
    (relative) bound the solve.
    """
    rules, solving = rules or AllocationRules(), solving or SolverOptions()
    scope, require_top, uniform_per_layer, prune = rules.scope, rules.require_top, rules.uniform_per_layer, rules.prune
    widths = list(widths)
    layers = sorted(costs)
    if not layers:
        raise MoecompressError("no MoE layers to allocate bits for")
    if (DROP in widths) != (prune is not None):
        raise ValueError("joint programs need both the drop choice (width 0) and PruneRules")
    for layer in layers:
        if costs[layer].shape != sizes[layer].shape or costs[layer].shape[1] != len(widths):
            raise ValueError(f"layer {layer}: costs {tuple(costs[layer].shape)} and sizes "
                             f"{tuple(sizes[layer].shape)} must both be (E, {len(widths)})")
    if prune is not None and (scope != "global" or uniform_per_layer):
        raise MoecompressError("joint pruning and quantisation needs one global program (same kept count in every "
                               "layer); it cannot be combined with per-layer programs or --uniform-per-layer")
    check_budget(sizes, widths, budget, uniform_per_layer, min(prune.feasible_kept) if prune else None,
                 0 if uniform_per_layer else require_top)
    started = time.perf_counter()
    if scope == "global":
        groups = [layers]
        budgets = [budget]
    elif scope == "layer":
        top = max(range(len(widths)), key=lambda c: widths[c])
        full = {layer: float(sizes[layer][:, top].sum()) for layer in layers}
        total = sum(full.values())
        groups = [[layer] for layer in layers]
        budgets = [budget * full[layer] / total for layer in layers]
    else:
        raise MoecompressError(f"unknown allocation scope {scope!r}; use 'layer' or 'global'")

    result_widths: dict[int, list[int]] = {}
    objective = size = 0.0
    statuses, gaps, variables = [], [], 0
    solver_name = ""
    for group, group_budget in zip(groups, budgets):
        part = _solve(costs, sizes, widths, group, group_budget, rules, solving)
        result_widths.update(part.widths)
        objective += part.objective
        size += part.size
        statuses.append(part.status)
        if part.gap is not None:
            gaps.append(part.gap)
        variables += part.variables
        solver_name = part.solver
    status = "optimal" if all(s == "optimal" for s in statuses) else "feasible"
    return Allocation(result_widths, objective, size, budget, status, max(gaps) if gaps else None, solver_name,
                      time.perf_counter() - started, variables)


def check_budget(sizes: dict[int, torch.Tensor], widths: Sequence[int], budget: float,
                 uniform_per_layer: bool = False, min_kept: int | None = None, require_top: int = 0) -> None:
    """A one-line error when even the smallest allowed choices exceed the budget (cheap; run it early).

    min_kept: for joint programs (width 0 = drop), the fewest experts a layer may keep.
    require_top: each layer keeps an expert at each of its `require_top` widest widths (counted
    as a lower bound: the cheapest expert's extra size for each such width).
    """
    widths = list(widths)
    narrowest = min(w for w in widths if w != DROP)
    if DROP in widths:
        drop = widths.index(DROP)
        others = [c for c in range(len(widths)) if c != drop]
        kept = min_kept or 1
        smallest = sum(float(s[:, others].amin(dim=1).sort().values[:kept].sum()) for s in sizes.values())
        what = f"keeping only {kept} expert(s) per layer at {narrowest} bits"
    elif uniform_per_layer:
        smallest = sum(float(s.sum(dim=0).amin()) for s in sizes.values())
        what = f"every layer at {narrowest} bits"
    else:
        smallest = sum(float(s.amin(dim=1).sum()) for s in sizes.values())
        what = f"every expert at {narrowest} bits"
        top = sorted((c for c, w in enumerate(widths) if w != DROP), key=lambda c: -widths[c])[:require_top]
        if top:
            # (E, C) sizes: forcing one expert per layer to each top width costs at least the cheapest extra
            smallest += sum(float((s[:, c] - s.amin(dim=1)).amin()) for s in sizes.values() for c in top)
            what = (f"every expert at {narrowest} bits except one per layer at "
                    f"{', '.join(str(widths[c]) for c in top)} bits (--require-top {require_top})")
    if smallest > budget * (1 + 1e-9):
        raise MoecompressError(f"the budget is too small: {what} already needs {smallest / max(budget, 1e-30):.3f}x "
                               "the budget; raise --bits/--size or allow narrower widths (--candidates)")


def _solve(costs: dict[int, torch.Tensor], sizes: dict[int, torch.Tensor], widths: list[int], layers: list[int],
           budget: float, rules: AllocationRules, solving: SolverOptions) -> Allocation:
    import pulp

    require_top, uniform_per_layer, prune = rules.require_top, rules.uniform_per_layer, rules.prune
    started = time.perf_counter()
    prob = pulp.LpProblem("moecompress_bits", pulp.LpMinimize)
    num_choices = len(widths)
    # scale costs and sizes to O(1) coefficients: solvers' tolerances are absolute
    scale = max(float(torch.cat([costs[layer].double().abs().flatten() for layer in layers]).mean()), 1e-30)
    unit = max(float(max(sizes[layer].double().abs().max() for layer in layers)), 1e-30)
    choice: dict[tuple[int, int, int], pulp.LpVariable] = {}
    objective_terms = []
    size_terms = []
    if uniform_per_layer:
        for layer in layers:
            layer_cost = costs[layer].double().sum(dim=0) / scale  # (C,)
            layer_size = sizes[layer].double().sum(dim=0) / unit
            for c in range(num_choices):
                var = pulp.LpVariable(f"x_{layer}_{c}", cat="Binary")
                choice[(layer, -1, c)] = var
                objective_terms.append((var, float(layer_cost[c])))
                size_terms.append((var, float(layer_size[c])))
            prob += pulp.lpSum(choice[(layer, -1, c)] for c in range(num_choices)) == 1
    else:
        for layer in layers:
            cost_rows = (costs[layer].double() / scale).tolist()
            size_rows = (sizes[layer].double() / unit).tolist()
            for e in range(len(cost_rows)):
                for c in range(num_choices):
                    var = pulp.LpVariable(f"x_{layer}_{e}_{c}", cat="Binary")
                    choice[(layer, e, c)] = var
                    objective_terms.append((var, float(cost_rows[e][c])))
                    size_terms.append((var, float(size_rows[e][c])))
                prob += pulp.lpSum(choice[(layer, e, c)] for c in range(num_choices)) == 1
        kept_widths = sorted({w for w in widths if w != DROP}, reverse=True)
        for width in kept_widths[:require_top]:
            c = widths.index(width)
            for layer in layers:
                prob += pulp.lpSum(choice[(layer, e, c)] for e in range(costs[layer].shape[0])) >= 1
        if prune is not None:
            _add_prune_rules(prob, choice, widths, layers, {layer: costs[layer].shape[0] for layer in layers}, prune)
    prob += pulp.LpAffineExpression(objective_terms)
    prob += pulp.LpAffineExpression(size_terms) <= budget / unit
    engine, engine_name = _solver(solving.name, solving.time_limit, solving.gap, solving.threads)
    prob.solve(engine)
    status = prob.sol_status
    if status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        raise MoecompressError(
            f"the bit-allocation program has no solution ({pulp.LpStatus[prob.status]}); "
            "loosen the budget or the constraints (--require-top, candidate widths)"
        )
    reached_gap = _highs_gap(prob) if engine_name == "highs" else None
    result: dict[int, list[int]] = {}
    total_cost = total_size = 0.0
    for layer in layers:
        count = costs[layer].shape[0]
        chosen = []
        for e in range(count):
            key_e = -1 if uniform_per_layer else e
            c = max(range(num_choices), key=lambda c: pulp.value(choice[(layer, key_e, c)]) or 0.0)
            chosen.append(widths[c])
            total_cost += float(costs[layer][e, c])
            total_size += float(sizes[layer][e, c])
        result[layer] = chosen
    return Allocation(result, total_cost, total_size, budget,
                      "optimal" if status == pulp.LpSolutionOptimal else "feasible", reached_gap, engine_name,
                      time.perf_counter() - started, len(choice))


def _add_prune_rules(prob, choice, widths: list[int], layers: list[int], experts: dict[int, int],  # noqa: ANN001
                     prune: PruneRules) -> None:
    """Same kept count K in every layer, K among the feasible counts, equal per group, protected kept.

    The feasible counts of a router are a contiguous range of experts kept per group, so one
    integer variable (kept per group) links all layers.
    """
    import pulp

    drop = widths.index(DROP)
    per_group = sorted({k // prune.n_group for k in prune.feasible_kept})
    if per_group != list(range(per_group[0], per_group[-1] + 1)):
        raise ValueError(f"feasible kept counts {prune.feasible_kept} are not a contiguous range per group")
    kept_per_group = pulp.LpVariable("kept_per_group", lowBound=per_group[0], upBound=per_group[-1], cat="Integer")
    for layer in layers:
        group_size = experts[layer] // prune.n_group
        for g in range(prune.n_group):
            members = range(g * group_size, (g + 1) * group_size)
            prob += pulp.lpSum(choice[(layer, e, drop)] for e in members) == group_size - kept_per_group
        for e in prune.protected.get(layer, []):
            prob += choice[(layer, e, drop)] == 0


def _highs_gap(prob) -> float | None:  # noqa: ANN001
    """The relative MIP gap HiGHS reached (0 when proven optimal), if it reports one."""
    model = getattr(prob, "solverModel", None)
    try:
        value = float(model.getInfo().mip_gap)
    except (AttributeError, TypeError, ValueError):
        return None
    return value if value == value and value < 1e30 else None  # NaN / inf when not a MIP
