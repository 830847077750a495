"""FlexOlmo: OLMoE-style softmax router, top-k, renormalised iff `norm_topk_prob`; every layer is MoE.

`num_local_experts` is an alias of `num_experts` in the config; the routed experts' width is
`intermediate_size` (there is no dense MLP).
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class FlexOlmoAdapter(MoEAdapter):
    model_types = ("flex_olmo",)
    block_attrs = ("mlp",)
    router_attr = "gate"
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "intermediate_size"
