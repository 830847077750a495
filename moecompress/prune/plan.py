"""`PrunePlan`: which experts each MoE layer keeps, and why (strict, versioned, JSON)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

PLAN_VERSION = 1


class PrunePlan(BaseModel):
    """Kept experts per MoE layer (decoder index -> sorted expert ids) and how they were chosen."""

    model_config = ConfigDict(extra="forbid")

    version: int = PLAN_VERSION
    method: str
    params: dict[str, Any] = {}
    allocation: str = "uniform"  # "uniform" or "global"
    domain: str | None = None
    num_experts: int
    top_k: int
    keep: dict[int, list[int]]
    protected: dict[int, list[int]] = {}
    scores: dict[int, list[float]] = {}

    @property
    def uniform(self) -> bool:
        """True when every layer keeps the same number of experts (stock configs can express it)."""
        return len({len(v) for v in self.keep.values()}) <= 1

    def kept_counts(self) -> dict[int, int]:
        """Experts kept per layer."""
        return {layer: len(ids) for layer, ids in sorted(self.keep.items())}
