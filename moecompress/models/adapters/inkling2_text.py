"""Inkling-2 text model (Thinking Machines): scored router with a correction bias, renormalised.

Routing per token (router `gate`, weight (E, H), buffer `e_score_correction_bias` (E,)):
s = score_fn(W x) (config.scoring_func, sigmoid by default); choose top-k of s + bias; weights
are s of the chosen experts divided by their sum, times route_scale. Experts use a softcapped
SwiGLU through the experts module's own `_apply_gate`. Every text layer is MoE, no shared
experts; config.intermediate_size is an alias of moe_intermediate_size.

Not replayable one layer at a time: every n_layers_per_attn_res_block layers the model stacks
the current hidden states into `block_states`, which later layers and the final read mix in
(attention residuals), so a layer's input is more than the previous layer's output.

Masking gives a masked expert the most negative logit and a bias of -inf, so it is never
chosen and the renormalisation runs over kept experts only.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class Inkling2TextAdapter(MoEAdapter):
    model_types = ("inkling2_text",)
    block_attrs = ("mlp",)
    router_attr = "gate"
    expert_count_keys = ("n_routed_experts",)
    intermediate_size_key = "moe_intermediate_size"
    correction_bias_paths = ("gate.e_score_correction_bias",)
    # block_states (the stacked hidden states of earlier blocks) flow between layers beside hidden_states
    layerwise_supported = False
