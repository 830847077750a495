"""Inkling text model (Thinking Machines): one router for routed and shared experts.

The router `gate` has weight (E + S, H): rows [0, E) score the routed experts, the last S rows
the shared experts. Per token: l = W x; choose top-k of sigmoid(l[:E]) + bias
(`e_score_correction_bias` (E,)); the chosen routed logits and the S shared logits are
normalised together, p_i = sigmoid(l_i) / sum_j sigmoid(l_j) over those k + S entries, and
scaled by route_scale * global_scale. The router returns (routed logits (T, E), routed
weights (T, k), index (T, k), shared weights (T, S)); the shared experts (each
moe_intermediate_size wide) are weighted by the last output and never pruned.

So the adapter treats only the first E router rows as experts: masking pads the logit mask
with the shared rows left unmasked, and dropping keeps the shared rows after the kept ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef, RouterOutput
from moecompress.models.adapters.shared_width import SharedWidthMixin


@register
class InklingTextAdapter(SharedWidthMixin, MoEAdapter):
    model_types = ("inkling_text",)
    block_attrs = ("mlp",)
    router_attr = "gate"
    shared_attrs = ("shared_experts",)
    expert_count_keys = ("n_routed_experts",)
    intermediate_size_key = "moe_intermediate_size"
    shared_count_key = "n_shared_experts"
    correction_bias_paths = ("gate.e_score_correction_bias",)

    def router_weight(self, router: nn.Module) -> torch.Tensor:
        """The routed experts' rows (E, H) of the joint (E + S, H) router weight."""
        return router.weight[: router.num_experts]

    def route(self, layer: MoELayerRef, hidden: torch.Tensor) -> RouterOutput:
        """The router's routed outputs (its fourth output, the shared weights, is left out)."""
        logits, weights, index, _shared = layer.router(hidden)
        return RouterOutput(logits=logits, weights=weights, index=index)

    def _install_logit_mask(self, router: nn.Module, weight_shape: torch.Size, mask: torch.Tensor) -> list[Any]:
        """Mask the routed rows of the joint logit computation; shared rows stay unmasked."""
        full_shape = router.weight.shape  # (E + S, H)
        padded = torch.zeros(full_shape[0], dtype=torch.bool)
        padded[: mask.shape[0]] = mask
        return MoEAdapter._install_logit_mask(router, full_shape, padded)

    def sliced_state_dict(
        self,
        model: nn.Module,
        keep_experts: dict[int, Sequence[int]] | None = None,
        keep_neurons: dict[int, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """As `MoEAdapter.sliced_state_dict`, keeping the shared experts' router rows after the kept ones."""
        state = super().sliced_state_dict(model, keep_experts, keep_neurons)
        for layer in self.moe_layers(model):
            experts_idx = (keep_experts or {}).get(layer.index)
            if experts_idx is None:
                continue
            key = f"{layer.router_path}.weight"
            weight = layer.router.weight.detach()  # (E + S, H)
            ids = torch.as_tensor(list(experts_idx), dtype=torch.long)
            state[key] = torch.cat([weight.index_select(0, ids), weight[layer.num_experts :]]).contiguous()
        return state
