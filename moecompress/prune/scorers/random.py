"""Random baseline: seeded uniform scores, so the kept set is a uniformly random subset per layer."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from moecompress.calibration.stats import RoutingStats
from moecompress.prune.scorers import ScoringContext, register_scorer


class RandomParams(BaseModel):
    """seed: the random draw (recorded in the manifest)."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0


@register_scorer("random", needs=(), params=RandomParams, summary="seeded random subset (baseline)")
def random_scores(stats: RoutingStats, params: RandomParams, domain: str | None,
                  context: ScoringContext | None) -> dict[int, torch.Tensor]:
    """S_j ~ U(0, 1), drawn per layer from a generator seeded with (seed, layer)."""
    out = {}
    for layer in stats.header.moe_layers:
        gen = torch.Generator().manual_seed(params.seed * 100_003 + layer)
        out[layer] = torch.rand(stats.header.num_experts, generator=gen, dtype=torch.float64)
    return out
