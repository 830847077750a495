"""Soft-count baseline: S_j = sum_t g_{j,t}, the summed combine weight of expert j."""

from __future__ import annotations

import torch

from moecompress.calibration.stats import RoutingStats
from moecompress.prune.scorers import NoParams, ScoringContext, per_layer, register_scorer


@register_scorer("soft_count", needs=("soft_count",), summary="summed router weight of each expert (baseline)")
def soft_count(stats: RoutingStats, params: NoParams, domain: str | None,
               context: ScoringContext | None) -> dict[int, torch.Tensor]:
    """S_j = sum_t g_{j,t} with g the coefficient the model applies (0 when j is not chosen)."""
    return per_layer(stats, "soft_count", domain)
