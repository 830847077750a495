"""EASY-EP: Domain-Specific Pruning of Large MoE Models with Few-shot Demonstrations (arXiv 2504.06792).

I_j = sum_{t in X_j} g_{j,t} ||f_j(x_t)|| s_t,   s_t = max(0, 1 - cos(h_t, h_t + y_t))

a SUM over the demonstration tokens routed to j (not a mean); h_t is the residual stream
entering the MoE block and y_t the routed experts' combined output. Multi-domain variant:
normalise each domain's per-layer scores to sum 1, then sum over domains.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from moecompress.calibration.stats import RoutingStats
from moecompress.prune.scorers import ScoringContext, per_layer, register_scorer


class EasyEpParams(BaseModel):
    """multi_domain: with several calibration domains and no --domain, normalise-and-sum them."""

    model_config = ConfigDict(extra="forbid")
    multi_domain: bool = True


@register_scorer("easy_ep", needs=("easy_ep",), params=EasyEpParams,
                 summary="gate-weighted output norm x hidden-state shift, summed (EASY-EP)")
def easy_ep(stats: RoutingStats, params: EasyEpParams, domain: str | None,
            context: ScoringContext | None) -> dict[int, torch.Tensor]:
    """I_j per layer; for several domains (domain=None, multi_domain) sum of per-domain normalised scores."""
    domains = stats.header.domains
    if domain is not None or len(domains) == 1 or not params.multi_domain:
        return per_layer(stats, "easy_ep", domain)
    total: dict[int, torch.Tensor] = {}
    for name in domains:
        for layer, scores in per_layer(stats, "easy_ep", name).items():
            normalised = scores / scores.sum() if scores.sum() > 0 else scores
            total[layer] = total.get(layer, torch.zeros_like(scores)) + normalised
    return total
