"""Qwen2-MoE: softmax router, top-k, renormalised iff `norm_topk_prob`; one sigmoid-gated shared expert.

The shared expert is sized by its own key (`shared_expert_intermediate_size`) and dense
layers (`mlp_only_layers`, `decoder_sparse_step`) by `intermediate_size`, so the routed
experts' width (`moe_intermediate_size`) can be patched alone.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class Qwen2MoeAdapter(MoEAdapter):
    model_types = ("qwen2_moe",)
    routing = "softmax (renorm iff norm_topk_prob)"
    block_attrs = ("mlp",)
    router_attr = "gate"
    shared_attrs = ("shared_expert",)
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "moe_intermediate_size"
