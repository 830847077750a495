"""HEAPr: Hessian-based Efficient Atomic Expert Pruning in Output Space (arXiv 2509.22299).

An atomic expert is one intermediate neuron k of expert e (row k of gate/up, column k of down).
With a_{t,k} the down_proj input, w_k column k of W_down and g'_t = dLoss/d(expert e's output at
t), the second-order loss increase of removing neuron k is scored by

    S_{e,k} = E_t[a_{t,k}^2] * w_k^T M_e w_k,   M_e = (1/N_e) sum_t g'_t g'_t^T,

over the N_e tokens routed to e. moecompress uses the identity
w_k^T M_e w_k = (1/N_e) sum_t (g'_t . w_k)^2, accumulated per token by the observer
(`neuron_grad_proj`, O(E x I) memory, exact) next to `neuron_act_sq` = sum_t a_{t,k}^2, so

    S_{e,k} = (neuron_act_sq_{e,k} / N_e) * (neuron_grad_proj_{e,k} / N_e).

Scores are in loss units, comparable across layers: ranking is global across layers by
default. The gradient statistic needs the loss's backward pass (`calibrate --gradients` streams
it one decoder layer at a time, `moecompress.engine.backward`).
"""

from __future__ import annotations

import torch

from moecompress.calibration.stats import RoutingStats
from moecompress.prune.scorers import NoParams, ScoringContext, per_layer, register_scorer


@register_scorer("heapr", needs=("count", "neuron_act_sq", "neuron_grad_proj"), granularity="neuron",
                 summary="per-neuron second-order loss in output space (HEAPr atomic experts)")
def heapr(stats: RoutingStats, params: NoParams, domain: str | None,
          context: ScoringContext | None) -> dict[int, torch.Tensor]:
    """S_{e,k} = (act_sq / N_e) * (grad_proj / N_e) per layer, (E, I); 0 for experts no token reached."""
    counts = per_layer(stats, "count", domain)
    act_sq = per_layer(stats, "neuron_act_sq", domain)
    grad_proj = per_layer(stats, "neuron_grad_proj", domain)
    out = {}
    for layer, count in counts.items():
        n = count.double().clamp(min=1).unsqueeze(-1)  # (E, 1)
        scores = (act_sq[layer].double() / n) * (grad_proj[layer].double() / n)  # (E, I)
        out[layer] = torch.where(count.unsqueeze(-1) > 0, scores, torch.zeros_like(scores))
    return out
