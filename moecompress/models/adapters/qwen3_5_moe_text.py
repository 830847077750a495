"""Qwen3.5-MoE text model: softmax router, top-k, always renormalised; sigmoid-gated shared expert.

Every decoder layer is MoE (gated-DeltaNet or full attention before it, per `layer_types`).
The shared expert has its own width key (`shared_expert_intermediate_size`), so the routed
experts' width (`moe_intermediate_size`) can be patched alone. Only the text-only
`qwen3_5_moe_text` config is handled: the multimodal `qwen3_5_moe` wraps it in `text_config`.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class Qwen3_5MoeTextAdapter(MoEAdapter):
    model_types = ("qwen3_5_moe_text",)
    routing = "softmax-renorm"
    block_attrs = ("mlp",)
    router_attr = "gate"
    shared_attrs = ("shared_expert",)
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "moe_intermediate_size"
