"""Frequency baseline: S_j = N_j, the number of calibration tokens routed to expert j."""

from __future__ import annotations

from moecompress.prune.scorers import NoParams, per_layer, register_scorer


@register_scorer("frequency", needs=("count",), summary="tokens routed to each expert (baseline)")
def frequency(stats, params: NoParams, domain):
    """S_j = N_j = sum_t 1[j in K_t]."""
    return per_layer(stats, "count", domain)
