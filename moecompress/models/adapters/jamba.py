"""Jamba: Mamba/attention hybrid; softmax router, top-k, weights not renormalised.

The MoE block is the decoder layer's `feed_forward` in every `expert_layer_period`-th layer
(from `expert_layer_offset`); the others hold a dense MLP in the same slot. Dense MLPs and
routed experts are both sized by `intermediate_size`, so uniform neuron dropping is only
expressible when every layer is MoE (`expert_layer_period == 1`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moecompress.errors import MoecompressError
from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef


@register
class JambaAdapter(MoEAdapter):
    model_types = ("jamba",)
    routing = "softmax"
    block_attrs = ("feed_forward",)
    router_attr = "router"
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "intermediate_size"

    def check_width_patchable(self, config: Any) -> None:
        """Refuse when dense layers exist: they share `intermediate_size` with the routed experts."""
        if config.expert_layer_period != 1:
            raise MoecompressError(
                "this jamba model has dense MLP layers sized by the routed experts' intermediate_size; "
                "uniform neuron pruning cannot be saved as a stock config: prune whole experts instead"
            )

    def residual_module(self, model: nn.Module, layer: MoELayerRef) -> nn.Module | None:
        """The pre-MoE norm is `pre_ff_layernorm`; its input is the residual stream."""
        return self.decoder_layers(model)[layer.index].pre_ff_layernorm
