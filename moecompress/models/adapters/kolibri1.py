"""Kolibri-1 (Aleph Alpha): top-k on router logits plus a correction bias, sigmoid weights.

Routing per token (router `gate`, weight (E, H), buffer `e_score_correction_bias` (E,)):
l = W x; choose top-k of l + bias; weights are sigmoid(l) of the chosen experts, renormalised
when norm_topk_prob. A shared expert with its own width key (shared_expert_intermediate_size)
is never pruned; every decoder layer is MoE.

Masking gives a masked expert the most negative logit and a bias of -inf, so it is never
chosen. On CUDA with the router weight in the activations' dtype, transformers computes the
logits with `torch.mm` instead of `F.linear`; `mask_experts` then fails loudly (it finds no
logit computation to mask) rather than masking nothing.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class Kolibri1Adapter(MoEAdapter):
    model_types = ("kolibri1",)
    block_attrs = ("mlp",)
    router_attr = "gate"
    shared_attrs = ("shared_experts",)
    expert_count_keys = ("num_local_experts",)
    intermediate_size_key = "moe_intermediate_size"
    correction_bias_paths = ("gate.e_score_correction_bias",)
