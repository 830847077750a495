"""AFMoE (Arcee Trinity): sigmoid token-choice router with a block-level expert bias.

Routing per token (router `mlp.router` with an nn.Linear `gate` (E, H); block parameter
`expert_bias` (E,), passed to the router): s = sigmoid(W x); choose top-k of s + bias; weights
are s of the chosen experts divided by their sum, times route_scale. Shared experts
(`shared_experts`, moe_intermediate_size * num_shared_experts) are never pruned; the first
`num_dense_layers` layers are dense.

Masking gives a masked expert s = 0 and bias -inf, so it is never chosen and the
renormalisation runs over kept experts only.
"""

from __future__ import annotations

import torch

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoELayerRef
from moecompress.models.adapters.block_bias import BlockBiasRouterAdapter
from moecompress.models.adapters.shared_width import SharedWidthMixin


@register
class AfmoeAdapter(SharedWidthMixin, BlockBiasRouterAdapter):
    model_types = ("afmoe",)
    block_attrs = ("mlp",)
    router_attr = "router"
    router_weight_attr = "gate.weight"
    shared_attrs = ("shared_experts",)
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "moe_intermediate_size"
    shared_count_key = "num_shared_experts"
    block_bias_attr = "expert_bias"

    def router_inputs(self, layer: MoELayerRef, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The router expects (B, S, H): hidden (T, H) goes in as one sequence (1, T, H)."""
        return hidden.unsqueeze(0), layer.block.expert_bias
