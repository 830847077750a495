"""Cohere2-MoE: top-k on the raw logits, then softmax over the k chosen (or sigmoid, optionally renormalised).

Optional shared experts (`num_shared_experts`) sit in the block as one dense MLP sized
`intermediate_size * num_shared_experts`: the same key as the routed experts' width, so
uniform neuron dropping is only expressible without shared experts. With
`shared_expert_combination_strategy == "average"` the block halves the sum of routed and
shared outputs; the gate passed to visitors is the router's weight before that halving.
Dense prefix layers (`mlp_layer_types`) have their own width key.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moecompress.errors import MoecompressError
from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef


@register
class Cohere2MoeAdapter(MoEAdapter):
    model_types = ("cohere2_moe",)
    routing = "topk-softmax or topk-sigmoid (expert_selection_fn)"
    block_attrs = ("mlp",)
    router_attr = "gate"
    shared_attrs = ("shared_experts",)
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "intermediate_size"

    def check_width_patchable(self, config: Any) -> None:
        """Shared experts are sized by `intermediate_size` too; refuse when the model has any."""
        if getattr(config, "num_shared_experts", 0) > 0:
            raise MoecompressError(
                "this cohere2_moe model sizes its shared experts with the routed experts' intermediate_size; "
                "uniform neuron pruning cannot be saved as a stock config: prune whole experts instead"
            )

    def residual_module(self, model: nn.Module, layer: MoELayerRef) -> nn.Module | None:
        """Attention and MoE run in parallel on `input_layernorm(h)`; its input h is the residual stream."""
        return self.decoder_layers(model)[layer.index].input_layernorm
