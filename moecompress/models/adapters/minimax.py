"""MiniMax (MiniMax-Text-01): Mixtral-style softmax router, top-k, always renormalised.

Decoder layers alternate lightning (linear) attention and full attention (`layer_types`);
every layer is MoE. The routed experts' width is `intermediate_size`.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class MiniMaxAdapter(MoEAdapter):
    model_types = ("minimax",)
    block_attrs = ("mlp",)
    router_attr = "gate"
    expert_count_keys = ("num_local_experts",)
    intermediate_size_key = "intermediate_size"
