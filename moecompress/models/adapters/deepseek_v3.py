"""DeepSeek-V3: sigmoid router with a score-correction bias and group-limited selection.

Routing per token (router `gate`, weight (E, H), buffer `e_score_correction_bias` (E,)):
scores = sigmoid(W x); choice = scores + bias; keep the `topk_group` groups with the largest
top-2 sum of `choice`; take the top-k experts of `choice` inside them; weights are the
*un-biased* scores of those experts, renormalised when `norm_topk_prob`, times
`routed_scaling_factor`. Shared experts (`shared_experts`, width
moe_intermediate_size * n_shared_experts) run on every token and are never pruned.

Masking gives a masked expert a sigmoid score of 0 and a correction bias of -inf, so it is
never chosen and never counts in a group's top-2 sum, exactly as if it were removed (the
contract keeps the same number of experts in every group).
"""

from __future__ import annotations

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_family import DeepseekStyleAdapter


@register
class DeepseekV3Adapter(DeepseekStyleAdapter):
    model_types = ("deepseek_v3",)
    correction_bias_paths = ("gate.e_score_correction_bias",)
    group_keys = ("n_group", "topk_group")
    min_kept_per_group = 2  # a group is scored by the sum of its two best experts
