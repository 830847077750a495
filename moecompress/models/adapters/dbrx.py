"""DBRX (Databricks): softmax router, top-k, p-norm weights; experts flattened to 2-D.

Routing per token (block `transformer.blocks.L.ffn`, router `ffn.router.layer` (E, H)): the
router returns logits only; the block's own `route_tokens_to_experts` takes p = softmax(W x),
the top-k of p, and divides them by their moe_normalize_expert_weights-norm.

Experts (`ffn.experts.mlp`) hold three (E * I, H) parameters, w1 (gate), v1 (up) and w2, with
expert e in rows [e * I, (e + 1) * I): out = (silu(x w1_e^T) * (x v1_e^T)) w2_e, so w2_e^T is
the canonical (H, I) down map. The experts module does not use transformers' experts dispatch,
so `instrument` replaces its forward on the instance. Expert count, top-k and width live in
the nested config.ffn_config (moe_num_experts, moe_top_k, ffn_hidden_size). Uniform expert
and neuron pruning (`drop`) reshape the flattened tensors; the generic per-tensor hooks that
per-layer layouts use (`expert_param_names`, `_neuron_axes`) are refused.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.models.adapters import register
from moecompress.models.adapters.base import (
    CanonicalExpert,
    ExpertVisitor,
    MoEAdapter,
    MoELayerRef,
    RouterOutput,
)

# Names of the flattened (E * I, H) expert parameters under `experts.mlp`.
_EXPERT_PARAMS = ("w1", "v1", "w2")

_NO_LAYOUT = (
    "dbrx: per-layer expert counts and per-expert widths are not supported (experts are stored "
    "flattened); prune to the same number of experts (and width) in every layer"
)


@register
class DbrxAdapter(MoEAdapter):
    model_types = ("dbrx",)
    # instrument() swaps the experts' forward on the instance around reshaped weight views;
    # accelerate's disk offload swaps those weights per call, so calibrate DBRX in memory.
    streaming_supported = False
    layers_path = "transformer.blocks"
    block_attrs = ("ffn",)
    router_attr = "router"
    router_weight_attr = "layer.weight"
    experts_attr = "experts"
    expert_count_keys = ("moe_num_experts",)
    top_k_key = "moe_top_k"
    intermediate_size_key = "ffn_hidden_size"

    # ------------------------------------------------------------------ config (nested ffn_config)
    def num_experts(self, config: Any) -> int:
        """Routed experts per layer: config.ffn_config.moe_num_experts."""
        return int(config.ffn_config.moe_num_experts)

    def top_k(self, config: Any) -> int:
        """Experts per token: config.ffn_config.moe_top_k."""
        return int(config.ffn_config.moe_top_k)

    def patched_config(
        self, config: Any, num_experts: int | None = None, intermediate_size: int | None = None
    ) -> Any:
        """A copy of `config` with ffn_config's expert count and/or expert width replaced."""
        new = copy.deepcopy(config)
        if num_experts is not None:
            new.ffn_config.moe_num_experts = int(num_experts)
        if intermediate_size is not None:
            new.ffn_config.ffn_hidden_size = int(intermediate_size)
        return new

    # ------------------------------------------------------------------ router
    def route(self, layer: MoELayerRef, hidden: torch.Tensor) -> RouterOutput:
        """The router's logits and the block's own top-k selection for hidden (T, H)."""
        logits = layer.router(hidden)  # (T, E)
        weights, index = layer.block.route_tokens_to_experts(logits)  # (T, k), (T, k)
        return RouterOutput(logits=logits, weights=weights, index=index)

    def router_logits_from_output(self, output: Any) -> torch.Tensor:
        """The DBRX router returns the (T, E) logits themselves."""
        return output

    # ------------------------------------------------------------------ experts
    @staticmethod
    def _per_expert(layer: MoELayerRef, name: str) -> torch.Tensor:
        """Flattened parameter `name` viewed as (E, I, H)."""
        flat = getattr(layer.experts.mlp, name)  # (E * I, H)
        return flat.view(layer.num_experts, -1, flat.shape[-1])

    def expert_weights(self, layer: MoELayerRef, expert: int) -> CanonicalExpert:
        """Expert `expert` as canonical maps: gate = w1_e, up = v1_e, down = w2_e^T (views)."""
        act_fn = layer.experts.mlp.activation_fn
        return CanonicalExpert(
            gate=self._per_expert(layer, "w1")[expert],  # (I, H)
            up=self._per_expert(layer, "v1")[expert],  # (I, H)
            down=self._per_expert(layer, "w2")[expert].transpose(0, 1),  # (H, I)
            act=lambda gate, up: act_fn(gate) * up,
        )

    def run_experts(
        self,
        layer: MoELayerRef,
        hidden: torch.Tensor,
        index: torch.Tensor,
        weights: torch.Tensor,
        visit: ExpertVisitor | None = None,
        only: set[int] | None = None,
    ) -> torch.Tensor:
        """The routed experts' combined output for hidden (T, H), index/weights (T, k) -> (T, H).

        `only`: compute just these experts (as in `MoEAdapter.run_experts`).
        """
        w1, v1, w2 = (self._per_expert(layer, name) for name in _EXPERT_PARAMS)  # (E, I, H) each
        act_fn = layer.experts.mlp.activation_fn
        num_tokens, top_k = index.shape
        # Slot-major order (slot, then token) within each expert, as DBRX's own loop gathers tokens.
        slot_major = index.transpose(0, 1).reshape(-1)  # (k*T,), position p = slot * T + token
        order = torch.argsort(slot_major, stable=True)
        counts = torch.bincount(slot_major, minlength=layer.num_experts).tolist()
        flat_weights = weights.reshape(-1)  # (T*k,)
        out = torch.zeros(num_tokens * top_k, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            positions = order[start : start + count]  # (N_e,)
            start += count
            if only is not None and expert not in only:
                continue
            slot, token_idx = positions // num_tokens, positions % num_tokens
            rows = token_idx * top_k + slot  # (N_e,) positions in the token-major (T*k) list
            x = hidden[token_idx]  # (N_e, H)
            # The same matmuls, in the same order, as DbrxExpertGLU.forward, so results match bit for bit.
            gate_proj = x.matmul(w1[expert].T)  # (N_e, I)
            up_proj = x.matmul(v1[expert].T)  # (N_e, I)
            act = act_fn(gate_proj) * up_proj  # (N_e, I)
            y = act.matmul(w2[expert])  # (N_e, H)
            gate = flat_weights[rows]  # (N_e,)
            if visit is not None:
                visit(expert, token_idx, slot, x, act, y, gate)
            out[rows] = (y * gate.unsqueeze(-1)).float()
        return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)

    @contextlib.contextmanager
    def instrument(self, model: nn.Module, visitors: dict[int, ExpertVisitor]) -> Iterator[None]:
        """Within the context, layer L's experts compute through `run_experts` with visitors[L].

        DBRX's experts module has no experts-implementation dispatch, so its forward is
        replaced on the instance (the block calls it with hidden (B, S, H)) and restored after.
        """
        patched: list[nn.Module] = []
        try:
            for layer in self.moe_layers(model):
                if layer.index not in visitors:
                    continue

                def forward(hidden, top_k_index, top_k_weights, _layer=layer, _visit=visitors[layer.index]):
                    flat = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
                    out = self.run_experts(_layer, flat, top_k_index, top_k_weights, _visit)
                    return out.view(hidden.shape[0], -1, hidden.shape[-1])

                layer.experts.forward = forward
                patched.append(layer.experts)
            yield
        finally:
            for experts in patched:
                del experts.forward

    # ------------------------------------------------------------------ surgery
    def expert_param_names(self, layer: MoELayerRef) -> list[str]:
        """Refused: DBRX has no tensors with an expert axis 0 for generic slicing to use."""
        raise MoecompressError(_NO_LAYOUT)

    def _neuron_axes(self, layer: MoELayerRef) -> dict[str, tuple[int, str]]:
        """Refused: DBRX's neurons are rows of flattened (E * I, H) tensors, not an axis."""
        raise MoecompressError(_NO_LAYOUT)

    def sliced_state_dict(
        self,
        model: nn.Module,
        keep_experts: dict[int, Sequence[int]] | None = None,
        keep_neurons: dict[int, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The state dict with experts (rows of the flattened tensors) and/or neurons removed.

        keep_experts[L]: expert ids kept in layer L (router rows follow). keep_neurons[L]:
        (E_kept, m) neuron ids kept per kept expert.
        """
        keep_experts = keep_experts or {}
        keep_neurons = keep_neurons or {}
        state = dict(model.state_dict())
        for layer in self.moe_layers(model):
            experts_idx = keep_experts.get(layer.index)
            neurons = keep_neurons.get(layer.index)
            ids = None if experts_idx is None else torch.as_tensor(list(experts_idx), dtype=torch.long)
            for name in _EXPERT_PARAMS:
                key = f"{layer.experts_path}.mlp.{name}"
                hidden_size = state[key].shape[-1]
                per_expert = state[key].view(layer.num_experts, -1, hidden_size)  # (E, I, H)
                if ids is not None:
                    per_expert = per_expert.index_select(0, ids)
                if neurons is not None:
                    index = neurons.long().unsqueeze(-1).expand(-1, -1, hidden_size)  # (E_kept, m, H)
                    per_expert = torch.gather(per_expert, 1, index)
                state[key] = per_expert.reshape(-1, hidden_size).contiguous()
            if ids is not None:
                key = f"{layer.router_path}.{self.router_weight_attr}"
                state[key] = state[key].index_select(0, ids).contiguous()
        return state
