"""Choose which intermediate neurons (atomic experts) each routed expert keeps, from (E, I) scores.

Two allocations for a prune `ratio` (fraction of all routed-expert neurons removed):

* global (HEAPr's default): one ranking over every neuron of every expert of every MoE layer;
  the lowest-scoring ratio x total are removed. Every expert keeps at least `min_width`
  neurons (its best ones), and protected (super) experts keep all of theirs. Widths then
  differ per expert, which only moecompress's layout loader can hold;
* uniform: every expert keeps its own top m = round(I x (1 - ratio)) neurons, so every
  expert has the same width and the checkpoint loads in plain transformers. Super experts
  cannot keep a wider width in this layout; like every expert they keep their top-m neurons.
"""

from __future__ import annotations

import torch

from moecompress.errors import MoecompressError


def check_neuron_ratio(ratio: float | None, keep: int | None) -> float:
    """The fraction of neurons to remove; neuron methods take --ratio, not --keep."""
    if keep is not None:
        raise MoecompressError("neuron pruning takes --ratio (fraction of routed-expert neurons removed), not --keep")
    if ratio is None:
        raise MoecompressError("pass --ratio: the fraction of routed-expert neurons to remove")
    if not 0.0 <= ratio < 1.0:
        raise MoecompressError(f"--ratio must be in [0, 1): the fraction of routed-expert neurons to remove (got {ratio})")
    return ratio


def select_neurons_uniform(scores: dict[int, torch.Tensor], ratio: float) -> dict[int, list[torch.Tensor]]:
    """Every expert keeps its top m = round(I (1 - ratio)) neurons (at least 1); ids ascending."""
    out = {}
    for layer, layer_scores in sorted(scores.items()):
        num_experts, width = layer_scores.shape
        m = max(1, int(round(width * (1.0 - ratio))))
        out[layer] = [_top(layer_scores[e], m) for e in range(num_experts)]
    return out


def _best_first(values: torch.Tensor) -> torch.Tensor:
    """Ids ordered by decreasing value along the last axis, ties towards the lower id."""
    return torch.sort(-values.double(), dim=-1, stable=True).indices


def _top(values: torch.Tensor, m: int) -> torch.Tensor:
    """Ids of the m largest values (ties towards the lower id), ascending."""
    return _best_first(values)[:m].sort().values


def select_neurons_global(scores: dict[int, torch.Tensor], ratio: float, protected: dict[int, list[int]] | None = None,
                          min_width: int = 1) -> dict[int, list[torch.Tensor]]:
    """Remove the round(ratio x all neurons) lowest-scoring neurons across layers and experts.

    Protected experts and each expert's `min_width` best neurons are never removed; a ratio
    that would need them raises an error naming the largest feasible ratio.
    """
    protected = protected or {}
    total = sum(s.numel() for s in scores.values())
    to_remove = int(round(ratio * total))
    candidate_scores, candidate_ids = [], []
    for layer, layer_scores in sorted(scores.items()):
        num_experts, width = layer_scores.shape
        keep_best = min(min_width, width)
        order = _best_first(layer_scores)  # (E, I)
        for e in range(num_experts):
            if e in set(protected.get(layer, [])):
                continue
            removable = order[e, keep_best:]  # (width - keep_best,)
            candidate_scores.append(layer_scores[e, removable].double())
            candidate_ids.append(torch.stack([torch.full_like(removable, layer), torch.full_like(removable, e),
                                              removable], dim=1))  # (n, 3): layer, expert, neuron
    if not candidate_ids:
        candidates = torch.zeros(0, 3, dtype=torch.long)
        values = torch.zeros(0, dtype=torch.float64)
    else:
        candidates = torch.cat(candidate_ids)
        values = torch.cat(candidate_scores)
    if to_remove > candidates.shape[0]:
        feasible = candidates.shape[0] / max(total, 1)
        raise MoecompressError(
            f"cannot remove {to_remove} of {total} neurons: protected super experts and the minimum width of "
            f"{min_width} per expert leave {candidates.shape[0]} removable; use --ratio <= {feasible:.4f}"
        )
    # lowest score first; ties broken by candidate order (layer, expert, then best neuron first)
    order = torch.sort(values, stable=True).indices
    removed = candidates[order[:to_remove]]
    keep_mask = {layer: torch.ones_like(s, dtype=torch.bool) for layer, s in scores.items()}
    for layer, e, k in removed.tolist():
        keep_mask[layer][e, k] = False
    return {layer: [torch.nonzero(mask[e]).flatten() for e in range(mask.shape[0])]
            for layer, mask in sorted(keep_mask.items())}
