"""Mixtral: softmax router over all experts, top-k, always renormalised; no shared expert.

The routed experts' width is the config's `intermediate_size` (Mixtral has no dense MLP).
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class MixtralAdapter(MoEAdapter):
    model_types = ("mixtral",)
    routing = "softmax-renorm"
    block_attrs = ("mlp",)
    router_attr = "gate"
    expert_count_keys = ("num_local_experts",)
    intermediate_size_key = "intermediate_size"
