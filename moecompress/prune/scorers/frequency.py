"""Frequency baseline: S_j = N_j, the number of calibration tokens routed to expert j."""

from __future__ import annotations

import torch

from moecompress.calibration.stats import RoutingStats
from moecompress.prune.scorers import NoParams, ScoringContext, per_layer, register_scorer


@register_scorer("frequency", needs=("count",), summary="tokens routed to each expert (baseline)")
def frequency(stats: RoutingStats, params: NoParams, domain: str | None,
              context: ScoringContext | None) -> dict[int, torch.Tensor]:
    """S_j = N_j = sum_t 1[j in K_t]."""
    return per_layer(stats, "count", domain)
