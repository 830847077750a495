"""`PrunePlan`: which experts (and neurons) each MoE layer keeps, and why (strict, versioned, JSON)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr

PLAN_VERSION = 1


class PrunePlan(BaseModel):
    """Kept experts per MoE layer (decoder index -> sorted expert ids) and how they were chosen.

    Neuron plans (granularity "neuron") keep every expert and record each expert's kept width
    in `widths`; the kept neuron ids themselves live in `neurons` (tensors, not serialised: the
    written checkpoint is their record).
    """

    model_config = ConfigDict(extra="forbid")

    version: int = PLAN_VERSION
    method: str
    params: dict[str, Any] = {}
    granularity: str = "expert"  # "expert" or "neuron"
    allocation: str = "uniform"  # "uniform" or "global"
    scoring: str = "one-pass"  # "one-pass" or "sequential" (moecompress.prune.sequential)
    domain: str | None = None
    num_experts: int
    top_k: int
    new_top_k: int | None = None  # the top-k written to the config, when asked to change it
    keep: dict[int, list[int]]
    protected: dict[int, list[int]] = {}
    scores: dict[int, list[float]] = {}
    intermediate_size: int | None = None
    widths: dict[int, list[int]] = {}  # neuron plans: layer -> kept width of each expert
    dynamic_skip: dict[int, float] = {}  # NAEE dynamic skipping: layer -> beta
    skip_fraction: float | None = None  # fraction of expert calls skipped on the calibration data
    merge: str = "none"  # "none", "centroid" or "cluster" (moecompress.prune.merge)
    merged: dict[int, list[list[int]]] = {}  # merge plans: layer -> experts merged into each kept expert (keep order)
    merge_weights: dict[int, list[list[float]]] = {}  # their frequency weights, aligned with `merged`
    _neurons: dict[int, list[torch.Tensor]] = PrivateAttr(default_factory=dict)

    @property
    def neurons(self) -> dict[int, list[torch.Tensor]]:
        """Neuron plans: layer -> kept neuron ids (1-D) of each kept expert."""
        return self._neurons

    def set_neurons(self, neurons: dict[int, list[torch.Tensor]]) -> None:
        """Attach the kept neuron ids and record the widths they give."""
        self._neurons = neurons
        self.widths = {layer: [int(ids.numel()) for ids in per] for layer, per in sorted(neurons.items())}

    @property
    def uniform(self) -> bool:
        """True when a stock config can express the plan: same expert count everywhere, same width everywhere."""
        same_count = len({len(v) for v in self.keep.values()}) <= 1
        same_width = len({w for per in self.widths.values() for w in per}) <= 1
        return same_count and same_width

    def merges(self, layer: int) -> list[list[tuple[int, float]]] | None:
        """Per kept expert of `layer` (keep order): (input expert, weight) merged into it; None when unmerged.

        Members of weight 0 are left out, so an expert nothing was merged into reads [(itself, 1.0)].
        """
        from moecompress.prune.merge import member_weights

        if layer not in self.merged:
            return None
        return [member_weights(ids, weights) for ids, weights in zip(self.merged[layer], self.merge_weights[layer])]

    def kept_counts(self) -> dict[int, int]:
        """Experts kept per layer."""
        return {layer: len(ids) for layer, ids in sorted(self.keep.items())}

    def neuron_fraction_kept(self) -> float | None:
        """Kept neurons / original neurons over all routed experts (neuron plans only)."""
        if not self.widths or not self.intermediate_size:
            return None
        kept = sum(sum(per) for per in self.widths.values())
        return kept / (self.intermediate_size * sum(len(per) for per in self.widths.values()))
