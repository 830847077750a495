"""MiniMax-M2: sigmoid router with a block-level score-correction bias, top-k, renormalised.

Routing per token (router `gate`, weight (E, H); block buffer `e_score_correction_bias` (E,),
passed to the router as an argument): s = sigmoid(W x); choose top-k of s + bias; weights are
s of the chosen experts divided by their sum. No shared experts; every layer is MoE and the
experts' width is config.intermediate_size.

Masking gives a masked expert s = 0 and bias -inf, so it is never chosen and the
renormalisation runs over kept experts only.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.block_bias import BlockBiasRouterAdapter


@register
class MiniMaxM2Adapter(BlockBiasRouterAdapter):
    model_types = ("minimax_m2",)
    block_attrs = ("mlp",)
    router_attr = "gate"
    expert_count_keys = ("num_local_experts",)
    intermediate_size_key = "intermediate_size"
    block_bias_attr = "e_score_correction_bias"
