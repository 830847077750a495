"""Aria text model: top-k on the raw logits, softmax over the k chosen; experts stored transposed.

Router `mlp.router`, experts `mlp.experts` with (E, H, 2I) / (E, I, H) weights (the base
adapter reads `is_transposed` from the experts module). Keys: `moe_num_experts`, `moe_topk`.
The shared experts are one MLP sized `intermediate_size * moe_num_shared_experts`, the same
key as the routed experts' width, so uniform neuron dropping needs a model without shared
experts. Only the text-only `aria_text` config is handled; the multimodal `aria` wraps it.
"""

from __future__ import annotations

from typing import Any

from moecompress.errors import MoecompressError
from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class AriaTextAdapter(MoEAdapter):
    model_types = ("aria_text",)
    routing = "topk-softmax"
    block_attrs = ("mlp",)
    router_attr = "router"
    shared_attrs = ("shared_experts",)
    expert_count_keys = ("moe_num_experts",)
    top_k_key = "moe_topk"
    intermediate_size_key = "intermediate_size"

    def check_width_patchable(self, config: Any) -> None:
        """Shared experts are sized by `intermediate_size` too; refuse when the model has any."""
        if getattr(config, "moe_num_shared_experts", 0) > 0:
            raise MoecompressError(
                "this aria_text model sizes its shared experts with the routed experts' intermediate_size; "
                "uniform neuron pruning cannot be saved as a stock config: prune whole experts instead"
            )
