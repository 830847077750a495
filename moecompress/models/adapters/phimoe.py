"""PhiMoE: sparsemixer routing (masked-softmax top-2 on the logits); router is an `nn.Linear` subclass.

The router lives at `mlp.router` and its logit weight is the Linear's own `weight`. Masking
experts works through the generic logit mask: sparsemixer's thresholds treat a most-negative
logit exactly like a missing expert. The routed experts' width is `intermediate_size`.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class PhimoeAdapter(MoEAdapter):
    model_types = ("phimoe",)
    routing = "sparsemixer"
    block_attrs = ("mlp",)
    router_attr = "router"
    expert_count_keys = ("num_local_experts",)
    intermediate_size_key = "intermediate_size"
