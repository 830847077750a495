"""Kimi-Linear (Moonshot): the DeepSeek-V3 router (sigmoid + correction bias + groups).

See deepseek_v3.py for the routing formula and masking argument. The config spells the keys
its own way (num_experts, num_experts_per_token, num_expert_group, num_shared_experts,
moe_renormalize) with the DeepSeek names as aliases. MoE layers are the "sparse" entries of
config.mlp_layer_types.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_v3 import DeepseekV3Adapter


@register
class KimiLinearAdapter(DeepseekV3Adapter):
    model_types = ("kimi_linear",)
    expert_count_keys = ("num_experts",)
    top_k_key = "num_experts_per_token"
    group_keys = ("num_expert_group", "topk_group")
    shared_count_key = "num_shared_experts"
