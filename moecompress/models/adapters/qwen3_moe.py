"""Qwen3-MoE (and the Qwen3-VL-MoE text tower): softmax router, top-k, optional renormalisation."""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class Qwen3MoeAdapter(MoEAdapter):
    model_types = ("qwen3_moe",)
    block_attrs = ("mlp",)
    router_attr = "gate"
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "moe_intermediate_size"
