"""HY-V3 (Tencent Hy3): sigmoid router with a block-level score-correction bias.

Routing per token (router `gate`, weight (E, H); block buffer `e_score_correction_bias` (E,),
passed to the router): s = sigmoid(W x); choose top-k of s + bias; weights are s of the chosen
experts divided by their sum, times router_scaling_factor. Shared experts (`shared_experts`,
moe_intermediate_size * num_shared_experts) are never pruned; MoE layers are the "sparse"
entries of config.mlp_layer_types.

Masking gives a masked expert s = 0 and bias -inf, so it is never chosen and the
renormalisation runs over kept experts only.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.block_bias import BlockBiasRouterAdapter
from moecompress.models.adapters.shared_width import SharedWidthMixin


@register
class HYV3Adapter(SharedWidthMixin, BlockBiasRouterAdapter):
    model_types = ("hy_v3",)
    block_attrs = ("mlp",)
    router_attr = "gate"
    shared_attrs = ("shared_experts",)
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "moe_intermediate_size"
    block_bias_attr = "e_score_correction_bias"
    shared_count_key = "num_shared_experts"
