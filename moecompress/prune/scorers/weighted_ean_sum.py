"""Weighted EAN (sum): the gate-weighted expert output norm summed over an expert's routed tokens.

S_j = sum_{t in X_j} g_{j,t} ||f_j(x_t)||   (the `weighted_ean_sum` criterion of CerebrasResearch/reap)

REAP (`reap`) is this sum divided by N_j. g is the coefficient the model applies (top-k
renormalised where the router renormalises); the reference weighs by the full softmax unless
its renormalisation option is on.
"""

from __future__ import annotations

import torch

from moecompress.calibration.stats import RoutingStats
from moecompress.prune.scorers import NoParams, ScoringContext, per_layer, register_scorer


@register_scorer("weighted_ean_sum", needs=("gated_out_norm",), summary="summed gate-weighted expert output norm "
                 "(REAP without the mean)")
def weighted_ean_sum(stats: RoutingStats, params: NoParams, domain: str | None,
                     context: ScoringContext | None) -> dict[int, torch.Tensor]:
    """S_j = gated_out_norm_j, the sum of g_{j,t} ||f_j(x_t)|| over the tokens routed to j."""
    return per_layer(stats, "gated_out_norm", domain)
