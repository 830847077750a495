"""Nemotron-H: Mamba-2 / attention / MLP / MoE mixers; DeepSeek-V3-style sigmoid router with non-gated experts.

Each decoder layer holds one mixer (`layers.L.mixer`, kind from `layers_block_type`); only
"moe" mixers have a router and experts. Routing: sigmoid of the logits plus the
`e_score_correction_bias` for selection, group-limited (`n_group` / `topk_group`), un-biased
scores gathered, optional renormalisation, times `routed_scaling_factor`. Experts are
non-gated, act(up(x)) then down (the base adapter reads `has_gate=False` from the experts
module). The shared expert (`moe_shared_expert_intermediate_size`) and dense "mlp" mixers
(`intermediate_size`) have their own width keys. With `moe_latent_size` set, the experts act
in the latent space between the block's `fc1_latent_proj` and `fc2_latent_proj`, so their
canonical weights, visitor inputs and outputs are latent-sized.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef


@register
class NemotronHAdapter(MoEAdapter):
    model_types = ("nemotron_h",)
    routing = "sigmoid-bias-group"
    block_attrs = ("mixer",)
    router_attr = "gate"
    shared_attrs = ("shared_experts",)
    expert_count_keys = ("n_routed_experts",)
    intermediate_size_key = "moe_intermediate_size"
    correction_bias_paths = ("gate.e_score_correction_bias",)
    min_kept_per_group = 2  # a group is scored by the sum of its top two experts
    group_keys = ("n_group", "topk_group")

    def residual_module(self, model: nn.Module, layer: MoELayerRef) -> nn.Module | None:
        """Each layer normalises its input with `norm` before the mixer; that input is the residual stream."""
        return self.decoder_layers(model)[layer.index].norm
