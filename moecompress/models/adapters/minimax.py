"""MiniMax (MiniMax-Text-01): Mixtral-style softmax router, top-k, always renormalised.

Decoder layers alternate lightning (linear) attention and full attention (`layer_types`);
every layer is MoE. The routed experts' width is `intermediate_size`.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef


@register
class MiniMaxAdapter(MoEAdapter):
    model_types = ("minimax",)
    routing = "softmax-renorm"
    block_attrs = ("mlp",)
    router_attr = "gate"
    expert_count_keys = ("num_local_experts",)
    intermediate_size_key = "intermediate_size"

    def residual_module(self, model: nn.Module, layer: MoELayerRef) -> nn.Module | None:
        """None: the MoE output is added to the block's own input (the output of `post_attention_layernorm`)."""
        return None
