"""OLMoE: softmax router, top-k, renormalised iff `norm_topk_prob`; every layer is MoE, no shared expert.

The routed experts' width is the config's `intermediate_size`.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class OlmoeAdapter(MoEAdapter):
    model_types = ("olmoe",)
    routing = "softmax (renorm iff norm_topk_prob)"
    block_attrs = ("mlp",)
    router_attr = "gate"
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "intermediate_size"
