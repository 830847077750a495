"""MiniMax-M3 text model: sigmoid router with a score-correction bias (selection only), top-k, renormalised.

The router (`mlp.gate`) selects on sigmoid(logits) + `e_score_correction_bias`, gathers the
un-biased scores and renormalises them; the block then multiplies the routed output by
`routed_scaling_factor` before adding the shared expert, so the gate seen by visitors is the
router's weight without that per-model constant. Experts use the clamped SwiGLU of GPT-OSS
on a concatenated (not interleaved) gate/up layout, read from the experts module's own
`_apply_gate`. Shared experts (`shared_intermediate_size`) and dense layers
(`dense_intermediate_size`) have their own width keys.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class MiniMaxM3VLTextAdapter(MoEAdapter):
    model_types = ("minimax_m3_vl_text",)
    routing = "sigmoid-bias"
    block_attrs = ("mlp",)
    router_attr = "gate"
    shared_attrs = ("shared_experts",)
    expert_count_keys = ("num_local_experts",)
    intermediate_size_key = "intermediate_size"
    correction_bias_paths = ("gate.e_score_correction_bias",)
