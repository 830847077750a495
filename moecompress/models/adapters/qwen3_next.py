"""Qwen3-Next: softmax router, top-k, renormalised iff `norm_topk_prob`; sigmoid-gated shared expert.

Decoder layers mix gated-DeltaNet (linear attention) and full attention (`layer_types`); the
MoE block is the same in both. The shared expert has its own width key
(`shared_expert_intermediate_size`) and dense layers use `intermediate_size`, so the routed
experts' width (`moe_intermediate_size`) can be patched alone.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class Qwen3NextAdapter(MoEAdapter):
    model_types = ("qwen3_next",)
    routing = "softmax (renorm iff norm_topk_prob)"
    block_attrs = ("mlp",)
    router_attr = "gate"
    shared_attrs = ("shared_expert",)
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "moe_intermediate_size"
