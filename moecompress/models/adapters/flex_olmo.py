"""FlexOlmo: OLMoE-style softmax router, top-k, renormalised iff `norm_topk_prob`; every layer is MoE.

`num_local_experts` is an alias of `num_experts` in the config; the routed experts' width is
`intermediate_size` (there is no dense MLP).
"""

from __future__ import annotations

from torch import nn

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef


@register
class FlexOlmoAdapter(MoEAdapter):
    model_types = ("flex_olmo",)
    routing = "softmax (renorm iff norm_topk_prob)"
    block_attrs = ("mlp",)
    router_attr = "gate"
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "intermediate_size"

    def residual_module(self, model: nn.Module, layer: MoELayerRef) -> nn.Module | None:
        """None (post-norm layers): the MoE block's own input is the residual stream (no norm before it)."""
        return None
