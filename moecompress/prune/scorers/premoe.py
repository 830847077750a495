"""PreMoe PEP: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval (arXiv 2505.17639).

TCESS_j = (1/T) sum_t 1[j in TopK(l_t) and softmax(l_t)_j >= r] l_{t,j}

with raw router logits l_t. This scorer implements the reference code's default setting,
top-k = 1 and threshold r off: TCESS_j = (1/T) sum_t 1[j = argmax l_t] l_{t,j}. It is computed
per calibration domain (task) with --domain, or over all calibration tokens.
"""

from __future__ import annotations

from moecompress.prune.scorers import NoParams, register_scorer


@register_scorer("premoe", needs=("top1_logit",), summary="task-conditional expected selection score (PreMoe TCESS)")
def premoe(stats, params: NoParams, domain):
    """TCESS_j = top1_logit_j / T for the domain (or all tokens)."""
    return {layer: stats.get("top1_logit", layer, domain) / max(stats.tokens(layer, domain), 1)
            for layer in stats.header.moe_layers}
