"""Turn per-expert scores into kept-expert sets, with every feasibility rule checked up front.

Rules (docs/methods/pruning.md): keep >= top_k experts per layer; for group-limited routers drop
the same number in every group, keep at least `min_kept_per_group` per group and
topk_group x kept_per_group >= top_k; protected (super) experts are always kept.
Uniform allocation keeps the same count in every layer (loads in stock transformers);
global allocation normalises scores per layer and applies one threshold across layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.errors import MoecompressError


@dataclass(frozen=True)
class RoutingShape:
    """What selection needs to know about a model's routers."""

    num_experts: int
    top_k: int
    groups: tuple[int, int] | None = None  # (n_group, topk_group)
    min_kept_per_group: int = 1


def kept_count(shape: RoutingShape, ratio: float | None = None, keep: int | None = None) -> int:
    """Experts kept per layer for a prune `ratio` (fraction removed) or an explicit `keep` count."""
    if (ratio is None) == (keep is None):
        raise MoecompressError("give exactly one of --ratio (fraction of experts removed) or --keep (experts kept)")
    if ratio is not None:
        if not 0.0 <= ratio < 1.0:
            raise MoecompressError(f"--ratio must be in [0, 1): the fraction of routed experts to remove (got {ratio})")
        keep = int(round(shape.num_experts * (1.0 - ratio)))
    assert keep is not None
    check_feasible(shape, keep)
    return keep


def feasible_counts(shape: RoutingShape) -> list[int]:
    """Every per-layer kept count the router can express."""
    return [keep for keep in range(1, shape.num_experts + 1) if not _problems(shape, keep)]


def _problems(shape: RoutingShape, keep: int) -> list[str]:
    """Why `keep` experts per layer cannot work (empty when it can)."""
    problems = []
    if keep > shape.num_experts:
        problems.append(f"the model has only {shape.num_experts} experts per layer")
    if keep < shape.top_k:
        problems.append(f"the router chooses top_k={shape.top_k}")
    if shape.groups is not None:
        n_group, topk_group = shape.groups
        if keep % n_group:
            problems.append(f"the router has {n_group} expert groups and drops must be equal per group")
        else:
            per_group = keep // n_group
            if per_group < shape.min_kept_per_group:
                problems.append(f"each group must keep at least {shape.min_kept_per_group}")
            if topk_group * per_group < shape.top_k:
                problems.append(f"topk_group={topk_group} groups x {per_group} kept per group < top_k={shape.top_k}")
    return problems


def check_feasible(shape: RoutingShape, keep: int) -> None:
    """Raise a one-line error naming the feasible counts when `keep` experts per layer cannot work."""
    problems = _problems(shape, keep)
    if problems:
        hint = ", ".join(map(str, feasible_counts(shape))) or "none"
        raise MoecompressError(f"cannot keep {keep} experts per layer: {'; '.join(problems)}; feasible counts: {hint} "
                               "(choose --ratio or --keep to match one)")


def select_uniform(scores: dict[int, torch.Tensor], shape: RoutingShape, keep: int,
                   protected: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
    """Keep the `keep` highest-scoring experts in every layer (per group for grouped routers).

    Protected experts are kept first; ties break towards the lower expert id.
    """
    check_feasible(shape, keep)
    protected = protected or {}
    plan: dict[int, list[int]] = {}
    for layer, layer_scores in sorted(scores.items()):
        if layer_scores.shape[0] != shape.num_experts:
            raise MoecompressError(f"scores for layer {layer} have {layer_scores.shape[0]} experts, expected {shape.num_experts}")
        groups = [list(range(shape.num_experts))]
        per_group = keep
        if shape.groups is not None:
            n_group = shape.groups[0]
            size = shape.num_experts // n_group
            groups = [list(range(g * size, (g + 1) * size)) for g in range(n_group)]
            per_group = keep // n_group
        must = set(protected.get(layer, []))
        kept: list[int] = []
        for members in groups:
            forced = [e for e in members if e in must]
            if len(forced) > per_group:
                raise MoecompressError(
                    f"layer {layer}: {len(forced)} protected super experts exceed the {per_group} experts kept "
                    f"{'per group' if shape.groups else 'per layer'}; keep more experts or pass --no-protect-super-experts"
                )
            rest = sorted((e for e in members if e not in must), key=lambda e: (-float(layer_scores[e]), e))
            kept.extend(forced + rest[: per_group - len(forced)])
        plan[layer] = sorted(kept)
    return plan


def select_global(scores: dict[int, torch.Tensor], shape: RoutingShape, keep: int,
                  protected: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
    """Keep keep x layers experts in total: scores normalised per layer (sum 1), one threshold.

    Every layer keeps at least top_k; counts differ per layer. Group-limited routers are not
    supported here (their drops must be equal per group).
    """
    if shape.groups is not None:
        raise MoecompressError("global (non-uniform) allocation is not available for group-limited routers; use uniform")
    check_feasible(shape, keep)
    protected = protected or {}
    layers = sorted(scores)
    budget = keep * len(layers)
    plan: dict[int, set[int]] = {layer: set(protected.get(layer, [])) for layer in layers}
    candidates = []
    for layer in layers:
        s = scores[layer].double()
        normalised = s / s.sum() if s.sum() > 0 else torch.full_like(s, 1.0 / len(s))
        order = sorted(range(len(s)), key=lambda e: (-float(normalised[e]), e))
        # the top_k best of every layer are mandatory
        for e in order:
            if len(plan[layer]) >= shape.top_k:
                break
            plan[layer].add(e)
        candidates.extend((float(normalised[e]), layer, e) for e in order if e not in plan[layer])
    used = sum(len(v) for v in plan.values())
    if used > budget:
        raise MoecompressError(f"protected and top-k experts ({used}) exceed the global budget ({budget}); keep more")
    candidates.sort(key=lambda item: (-item[0], item[1], item[2]))
    for _, layer, e in candidates[: budget - used]:
        plan[layer].add(e)
    return {layer: sorted(kept) for layer, kept in plan.items()}
