"""Beam (Reflection): DeepSeek-V3 style sigmoid router (correction bias + groups), no shared experts.

Routing as in deepseek_v3.py, except that routed_scaling_factor multiplies the block's
combined routed output (outside the router, so `RouterOutput.weights` excludes it). No shared
experts, so routed neuron pruning is expressible. MoE layers are the "sparse" entries of
config.mlp_layer_types.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class BeamAdapter(MoEAdapter):
    model_types = ("beam",)
    block_attrs = ("mlp",)
    router_attr = "gate"
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "moe_intermediate_size"
    correction_bias_paths = ("gate.e_score_correction_bias",)
    group_keys = ("n_group", "topk_group")
