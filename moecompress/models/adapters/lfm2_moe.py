"""LFM2-MoE (Liquid): sigmoid router with an optional block-level expert bias.

Routing per token (router `feed_forward.gate`, weight (E, H); block buffer `expert_bias` (E,)
when config.use_expert_bias, passed to the router): s = sigmoid(W x); choose top-k of s + bias
(or of s); weights are s of the chosen experts, renormalised when norm_topk_prob, times
routed_scaling_factor. The first `num_dense_layers` layers are dense; no shared experts.

Masking gives a masked expert s = 0 and bias -inf, so it is never chosen and the
renormalisation runs over kept experts only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef
from moecompress.models.adapters.block_bias import BlockBiasRouterAdapter


@register
class Lfm2MoeAdapter(BlockBiasRouterAdapter):
    model_types = ("lfm2_moe",)
    block_attrs = ("feed_forward",)
    router_attr = "gate"
    expert_count_keys = ("num_experts",)
    intermediate_size_key = "moe_intermediate_size"
    block_bias_attr = "expert_bias"

    def router_inputs(self, layer: MoELayerRef, hidden: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """hidden (T, H) and the block's expert bias (None when the config disables it)."""
        return hidden, (layer.block.expert_bias if layer.block.use_expert_bias else None)

    def mask_experts(self, model: nn.Module, keep: dict[int, Sequence[int]]) -> AbstractContextManager[None]:
        """As `MoEAdapter.mask_experts`; without an expert bias only the logits are masked."""
        if getattr(model.config, "use_expert_bias", True):
            return super().mask_experts(model, keep)
        unbiased = copy.copy(self)
        unbiased.correction_bias_paths = ()
        return MoEAdapter.mask_experts(unbiased, model, keep)
