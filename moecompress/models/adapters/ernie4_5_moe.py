"""ERNIE-4.5 MoE: softmax router whose selection adds a correction bias.

Routing per token (router `gate`, weight (E, H), `gate.moe_statics.e_score_correction_bias`
(1, E)): p = softmax(W x); choose top-k of p + bias; weights are p of the chosen experts
divided by max(sum, moe_norm_min). Masked experts get p = 0 and bias -inf, so they are never
chosen and the renormalisation runs over kept experts only. Shared experts
(`shared_experts`, moe_intermediate_size * moe_num_shared_experts) are never pruned.
"""

from __future__ import annotations

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_family import DeepseekStyleAdapter


@register
class Ernie45MoeAdapter(DeepseekStyleAdapter):
    model_types = ("ernie4_5_moe",)
    expert_count_keys = ("moe_num_experts",)
    top_k_key = "moe_k"
    shared_count_key = "moe_num_shared_experts"
    correction_bias_paths = ("gate.moe_statics.e_score_correction_bias",)
