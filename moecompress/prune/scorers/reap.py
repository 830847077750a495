"""REAP: Router-weighted Expert Activation Pruning (arXiv 2510.13999).

S_j = (1/N_j) sum_{t in X_j} g_{j,t} ||f_j(x_t)||

the mean, over the tokens routed to j, of the gate-weighted norm of the expert's output.
"""

from __future__ import annotations

import torch

from moecompress.calibration.stats import RoutingStats
from moecompress.prune.scorers import NoParams, ScoringContext, per_layer, register_scorer, safe_mean


@register_scorer("reap", needs=("count", "gated_out_norm"), summary="mean gate-weighted expert output norm (REAP)")
def reap(stats: RoutingStats, params: NoParams, domain: str | None,
         context: ScoringContext | None) -> dict[int, torch.Tensor]:
    """S_j = gated_out_norm_j / N_j (0 for experts no token reached)."""
    counts = per_layer(stats, "count", domain)
    gated = per_layer(stats, "gated_out_norm", domain)
    return {layer: safe_mean(gated[layer], counts[layer]) for layer in counts}
