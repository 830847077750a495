"""EXAONE-MoE (LG AI Research, K-EXAONE): the DeepSeek-V3 router (sigmoid + correction bias + groups).

See deepseek_v3.py for the routing formula and masking argument. Keys: num_experts,
num_shared_experts (shared experts are moe_intermediate_size * num_shared_experts wide);
MoE layers are the "sparse" entries of config.mlp_layer_types.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_v3 import DeepseekV3Adapter


@register
class ExaoneMoeAdapter(DeepseekV3Adapter):
    model_types = ("exaone_moe",)
    expert_count_keys = ("num_experts",)
    shared_count_key = "num_shared_experts"
