"""EAN: Expert Activation Norm, the mean output norm of an expert on its routed tokens.

S_j = (1/N_j) sum_{t in X_j} ||f_j(x_t)||   (the REAP paper's EAN / MAN baseline, arXiv 2510.13999)
"""

from __future__ import annotations

import torch

from moecompress.calibration.stats import RoutingStats
from moecompress.prune.scorers import NoParams, ScoringContext, per_layer, register_scorer, safe_mean


@register_scorer("ean", needs=("count", "out_norm"), summary="mean expert output norm on routed tokens")
def ean(stats: RoutingStats, params: NoParams, domain: str | None,
        context: ScoringContext | None) -> dict[int, torch.Tensor]:
    """S_j = out_norm_j / N_j (0 for experts no token reached)."""
    counts = per_layer(stats, "count", domain)
    norms = per_layer(stats, "out_norm", domain)
    return {layer: safe_mean(norms[layer], counts[layer]) for layer in counts}
