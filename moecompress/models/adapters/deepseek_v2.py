"""DeepSeek-V2: softmax router, greedy or group-limited top-k, routed scaling factor.

Routing per token (router `gate`, weight (E, H)): scores = softmax(W x); with
topk_method="group_limited_greedy" only the `topk_group` groups with the largest max-score
stay eligible; the top-k scores (not renormalised) times `routed_scaling_factor` weight the
chosen experts. Shared experts (`shared_experts`, moe_intermediate_size * n_shared_experts)
are never pruned.
"""

from __future__ import annotations

from typing import Any

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_family import DeepseekStyleAdapter


@register
class DeepseekV2Adapter(DeepseekStyleAdapter):
    model_types = ("deepseek_v2",)
    group_keys = ("n_group", "topk_group")

    def groups(self, config: Any) -> tuple[int, int] | None:
        """Groups matter only for the group-limited top-k method; greedy routing ignores them."""
        if getattr(config, "topk_method", "greedy") != "group_limited_greedy":
            return None
        return super().groups(config)
