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
Per-layer expert layouts (which slice tensors named by `expert_param_names` and the router
rows generically) would cut the shared rows, so they are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef, RouterOutput
from moecompress.models.adapters.shared_width import SharedWidthMixin

_NO_LAYOUT = (
    "inkling_text: per-layer expert layouts are not supported (the router's last rows belong to the "
    "shared experts); keep the same number of experts in every layer"
)


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

    def _install_logit_mask(
        self, router: nn.Module, weight_shape: torch.Size, mask: torch.Tensor
    ) -> list[Any]:
        """Mask the routed rows of the joint logit computation; shared rows stay unmasked."""
        full_shape = router.weight.shape  # (E + S, H)
        padded = torch.zeros(full_shape[0], dtype=torch.bool)
        padded[: mask.shape[0]] = mask
        return MoEAdapter._install_logit_mask(router, full_shape, padded)

    def expert_param_names(self, layer: MoELayerRef) -> list[str]:
        """Refused: generic per-tensor slicing would also cut the shared experts' router rows."""
        raise MoecompressError(_NO_LAYOUT)

    def sliced_state_dict(
        self,
        model: nn.Module,
        keep_experts: dict[int, Sequence[int]] | None = None,
        keep_neurons: dict[int, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The state dict with experts removed; the shared experts' router rows follow the kept ones."""
        if keep_neurons:
            self.check_width_patchable(model.config)  # raises while shared experts exist
            raise MoecompressError("inkling_text: routed-expert neuron pruning is not supported")
        state = dict(model.state_dict())
        for layer in self.moe_layers(model):
            experts_idx = (keep_experts or {}).get(layer.index)
            if experts_idx is None:
                continue
            ids = torch.as_tensor(list(experts_idx), dtype=torch.long)
            for name in ("gate_up_proj", "down_proj"):
                key = f"{layer.experts_path}.{name}"
                state[key] = state[key].index_select(0, ids).contiguous()
            weight = state[f"{layer.router_path}.weight"]  # (E + S, H)
            shared_rows = weight[layer.num_experts :]  # (S, H)
            kept_rows = weight.index_select(0, ids)  # (E_kept, H)
            state[f"{layer.router_path}.weight"] = torch.cat([kept_rows, shared_rows]).contiguous()
            bias_key = f"{layer.path}.{self.correction_bias_paths[0]}"
            state[bias_key] = state[bias_key].index_select(0, ids).contiguous()
        return state
