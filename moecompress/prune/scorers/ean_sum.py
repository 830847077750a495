"""EAN (sum): Expert Activation Norm summed over an expert's routed tokens, as the REAP reference computes EAN.

S_j = sum_{t in X_j} ||f_j(x_t)||   (the `ean_sum` criterion of CerebrasResearch/reap, arXiv 2510.13999)

Unlike `ean` (the mean over X_j), the sum grows with how often j is routed: an expert that
few tokens reach scores low however large its outputs, which the mean does not see.
"""

from __future__ import annotations

import torch

from moecompress.calibration.stats import RoutingStats
from moecompress.prune.scorers import NoParams, ScoringContext, per_layer, register_scorer


@register_scorer("ean_sum", needs=("out_norm",), summary="summed expert output norm on routed tokens (EAN as REAP's "
                 "reference computes it)")
def ean_sum(stats: RoutingStats, params: NoParams, domain: str | None,
            context: ScoringContext | None) -> dict[int, torch.Tensor]:
    """S_j = out_norm_j, the sum of ||f_j(x_t)|| over the tokens routed to j."""
    return per_layer(stats, "out_norm", domain)
