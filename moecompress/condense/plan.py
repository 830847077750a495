"""`CondensePlan`: which MoE layers are condensed, with which experts and fixed weights (strict, JSON)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

PLAN_VERSION = 1
CRITERIA = ("recon", "js")


class CondensePlan(BaseModel):
    """Condensed decoder layers -> kept routed experts (greedy order) and their mean gates wbar_e.

    expert_search[L]: the criterion after each greedy step of layer L's expert search, and
    searched_experts[L] / searched_weights[L] its result, for every searched layer (condensed
    or not). layer_search: the criterion on the last hidden states
    after each greedy layer step (empty when the layers were given explicitly).
    """

    model_config = ConfigDict(extra="forbid")

    version: int = PLAN_VERSION
    criterion: str  # "recon" (reconstruction error) or "js" (Jensen-Shannon divergence, the paper's)
    layer_selection: str  # "auto" or "explicit"
    experts_per_layer: int
    num_experts: int
    top_k: int
    layers: list[int]  # condensed decoder layers, in the order chosen
    experts: dict[int, list[int]]  # condensed layer -> expert ids, greedy order
    weights: dict[int, list[float]]  # condensed layer -> wbar_e of those experts
    expert_search: dict[int, list[float]] = {}
    searched_experts: dict[int, list[int]] = {}
    searched_weights: dict[int, list[float]] = {}
    layer_search: list[float] = []
    tokens: int = 0
    cost: dict[str, Any] = {}

    def condensed(self) -> dict[int, tuple[list[int], list[float]]]:
        """Condensed layer -> (experts, weights), in decoder order."""
        return {layer: (self.experts[layer], self.weights[layer]) for layer in sorted(self.layers)}
