"""Flint (RecursiveSI): sigmoid router without a correction bias, top-k, optional renormalisation.

Routing per token (router `gate`, weight (E, H)): s = sigmoid(W x); the top-k s weight the
chosen experts, divided by their sum when norm_topk_prob. An ungated shared expert
(`shared_expert`, its own width key shared_expert_intermediate_size) is always added and never
pruned. MoE layers follow decoder_sparse_step and skip config.mlp_only_layers.

Masking gives a masked expert s = 0, so it is never chosen while kept experts score above 0.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class FlintAdapter(MoEAdapter):
    model_types = ("flint",)
    block_attrs = ("mlp",)
    router_attr = "gate"
    shared_attrs = ("shared_expert",)
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "moe_intermediate_size"
