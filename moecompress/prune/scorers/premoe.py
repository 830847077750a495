"""PreMoe PEP: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval (arXiv 2505.17639).

TCESS_j = (1/T) sum_t 1[j in TopK(l_t) and softmax(l_t)_j >= r] l_{t,j}

with raw router logits l_t, computed per calibration domain (task) with --domain, or over all
calibration tokens. With the reference code's defaults (top_k = 1, threshold r off) this is
TCESS_j = (1/T) sum_t 1[j = argmax l_t] l_{t,j}, read from the observer's `top1_logit`
statistic; any other top_k or a threshold runs a light router-logit pass over the
calibration data (`moecompress.prune.tcess`).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from moecompress.calibration.stats import RoutingStats
from moecompress.prune.scorers import ScoringContext, register_scorer
from moecompress.prune.tcess import collect_tcess


class PremoeParams(BaseModel):
    """top_k: experts per token that count (reference: 1); threshold: minimum softmax probability r (off)."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(1, ge=1)
    threshold: float | None = Field(None, gt=0.0, lt=1.0)

    @property
    def is_default(self) -> bool:
        """True for the reference setting that the observer's top1_logit statistic covers."""
        return self.top_k == 1 and self.threshold is None


@register_scorer("premoe", needs=lambda p: ("top1_logit",) if p.is_default else (), params=PremoeParams,
                 needs_model=lambda p: not p.is_default,
                 summary="task-conditional expected selection score (PreMoe TCESS)")
def premoe(stats: RoutingStats, params: PremoeParams, domain: str | None,
           context: ScoringContext | None) -> dict[int, torch.Tensor]:
    """TCESS_j per layer for the domain (or all tokens)."""
    if params.is_default:
        return {layer: stats.get("top1_logit", layer, domain) / max(stats.tokens(layer, domain), 1)
                for layer in stats.header.moe_layers}
    assert context is not None
    sums, tokens = collect_tcess(context.model, context.adapter, context.batches_for(domain), params.top_k,
                                 params.threshold, progress=context.progress)
    total = sum(tokens.values())
    return {layer: sum(per.values()) / max(total, 1) for layer, per in sums.items()}
