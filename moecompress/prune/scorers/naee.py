"""NAEE: Not All Experts are Equal, Efficient Expert Pruning and Skipping for MoE LLMs (arXiv 2402.14800).

Per MoE layer, keep the subset S of r experts minimising the reconstruction error of the
layer's output on cached calibration inputs X, with the pruned experts removed from routing:

    S* = argmin_{|S| = r} || Z - Z_S ||_F,   Z = MoE(X), Z_S = MoE restricted to S (router masked).

Exhaustive over all C(E, r) subsets when that number is at most `max_subsets` (the paper's
setting for Mixtral's 8 experts); otherwise greedy backward elimination: starting from all
experts, repeatedly remove the expert whose removal increases the error least. Protected
(super) experts are always in S, and group-limited routers keep the same number per group.
Inputs are the ORIGINAL model's layer inputs (`moecompress.prune.reconstruction`).

Scores returned (higher = keep): 1 for experts in S; dropped experts get their greedy removal
step / E (earlier removal = lower), or 0 after an exhaustive search.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from moecompress.calibration.stats import RoutingStats
from moecompress.errors import MoecompressError
from moecompress.prune.reconstruction import block_inputs, block_output, reconstruction_error
from moecompress.prune.scorers import ScoringContext, register_scorer


class NaeeParams(BaseModel):
    """search: auto (exhaustive when C(E, r) <= max_subsets), exhaustive or greedy; max_tokens: inputs per layer."""

    model_config = ConfigDict(extra="forbid")
    search: Literal["auto", "exhaustive", "greedy"] = "auto"
    max_subsets: int = Field(2000, ge=1)
    max_tokens: int = Field(4096, ge=1)


def _groups(num_experts: int, shape: object) -> list[list[int]]:
    groups = getattr(shape, "groups", None)
    if groups is None:
        return [list(range(num_experts))]
    size = num_experts // groups[0]
    return [list(range(g * size, (g + 1) * size)) for g in range(groups[0])]


def count_subsets(groups: list[list[int]], per_group: int, protected: set[int]) -> int:
    """Feasible subsets: per group, choose the free experts that join its protected ones."""
    total = 1
    for members in groups:
        forced = sum(1 for e in members if e in protected)
        total *= math.comb(len(members) - forced, per_group - forced) if per_group >= forced else 0
    return total


def exhaustive_subset(error: Callable[[list[int]], float], groups: list[list[int]], per_group: int,
                      protected: set[int]) -> list[int]:
    """The feasible subset with the smallest error (ties: the first in lexicographic order)."""
    choices = []
    for members in groups:
        forced = [e for e in members if e in protected]
        free = [e for e in members if e not in protected]
        choices.append([forced + list(c) for c in itertools.combinations(free, per_group - len(forced))])
    best, best_error = None, math.inf
    for parts in itertools.product(*choices):
        subset = sorted(e for part in parts for e in part)
        value = error(subset)
        if value < best_error:
            best, best_error = subset, value
    assert best is not None
    return best


def greedy_subset(error: Callable[[list[int]], float], groups: list[list[int]], per_group: int,
                  protected: set[int]) -> tuple[list[int], list[int]]:
    """Backward elimination down to per_group experts per group; returns (kept, removal order)."""
    current = {e for members in groups for e in members}
    group_of = {e: g for g, members in enumerate(groups) for e in members}
    sizes = [len(members) for members in groups]
    removed: list[int] = []
    while any(size > per_group for size in sizes):
        candidates = [e for e in sorted(current) if e not in protected and sizes[group_of[e]] > per_group]
        if not candidates:
            raise MoecompressError("protected super experts leave no expert to remove; keep more experts")
        trials = [(error(sorted(current - {e})), e) for e in candidates]
        _, worst = min(trials)
        current.remove(worst)
        sizes[group_of[worst]] -= 1
        removed.append(worst)
    return sorted(current), removed


@register_scorer("naee", needs=(), params=NaeeParams, needs_model=True,
                 summary="subset minimising the layer-output reconstruction error (NAEE)")
def naee(stats: RoutingStats, params: NaeeParams, domain: str | None,
         context: ScoringContext | None) -> dict[int, torch.Tensor]:
    """1 for the experts of the best subset per layer, lower for the others (see module docstring)."""
    assert context is not None
    if context.keep is None:
        raise MoecompressError("naee searches a fixed number of experts per layer: use --allocation uniform")
    out: dict[int, torch.Tensor] = {}
    inputs = block_inputs(context.model, context.adapter, context.batches_for(domain), params.max_tokens,
                          context.seed, context.progress)
    for layer, tokens in inputs:
        num = layer.num_experts
        groups = _groups(num, context.shape)
        per_group = context.keep // len(groups)
        protected = set(context.protected.get(layer.index, []))
        reference = block_output(context.model, context.adapter, layer, tokens)

        def error(subset: Sequence[int], _layer=layer, _tokens=tokens, _ref=reference) -> float:
            return reconstruction_error(_ref, block_output(context.model, context.adapter, _layer, _tokens, subset))

        total = count_subsets(groups, per_group, protected)
        if total == 0:
            raise MoecompressError(f"layer {layer.index}: protected super experts exceed the {per_group} experts kept "
                                   f"{'per group' if len(groups) > 1 else 'per layer'}; keep more experts or pass "
                                   "--no-protect-super-experts")
        exhaustive = params.search == "exhaustive" or (params.search == "auto" and total <= params.max_subsets)
        scores = torch.zeros(num, dtype=torch.float64)
        if exhaustive:
            kept = exhaustive_subset(error, groups, per_group, protected)
        else:
            kept, removed = greedy_subset(error, groups, per_group, protected)
            for step, expert in enumerate(removed):
                scores[expert] = step / num
        scores[kept] = 1.0
        out[layer.index] = scores
    return out
