"""Laguna (Poolside): sigmoid router with a score-correction bias and optional logit softcap.

Routing per token (router `gate`, weight (E, H), parameter `e_score_correction_bias` (E,)):
l = W x, softcapped as cap * tanh(l / cap) when moe_router_logit_softcapping > 0;
s = sigmoid(l); choose top-k of s + bias; weights are s of the chosen experts divided by their
sum. The block then multiplies the routed output by moe_routed_scaling_factor (outside the
router, so `RouterOutput.weights` excludes it) and adds a shared expert whose width is its own
key (shared_expert_intermediate_size), so routed neuron pruning is expressible.

Masking: a masked expert's bias is -inf, so it is never chosen even when softcapping keeps
its score above 0, and the renormalisation runs over the chosen (kept) experts only.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class LagunaAdapter(MoEAdapter):
    model_types = ("laguna",)
    block_attrs = ("mlp",)
    router_attr = "gate"
    shared_attrs = ("shared_experts",)
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "moe_intermediate_size"
    correction_bias_paths = ("gate.e_score_correction_bias",)
