"""Routed experts of a GPTQ folder kept packed, dequantised only for the experts tokens are routed to.

A 2.5-bit model is small only while its weights stay packed. In `load_quantized(..., dequantize="use")`
every MoE layer's experts module keeps its fused weights on the meta device; each call of it

    out_t = sum_{e in topk(t)} g_{t,e} f_e(x_t)

dequantises the experts that at least one token is routed to, at most `per_group` at a time,
into a scratch experts module of the same class (built from the config with `per_group`
experts), computes them on their tokens through `MoEAdapter.run_experts` (visitors see each
expert with its own index) and frees them before the next group. Memory holds the packed
tensors plus one group of dense experts; a decoding step that routes one token to k experts
dequantises k experts per layer, not the whole layer.

The experts module selects the ``"moecompress_packed"`` entry of transformers' experts
registry (`ALL_EXPERTS_FUNCTIONS`), so the model's own block code (router, shared experts,
residual) runs unchanged; moecompress's observers and dynamic skipping, which route experts
through `run_experts`, reach the packed experts the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moecompress.engine.expert_groups import ExpertsCall, run_in_groups
from moecompress.models.adapters.base import EXPERT_SOURCE_ATTR, ExpertVisitor, MoEAdapter, MoELayerRef
from moecompress.models.adapters.instrument import select_experts_implementation

IMPLEMENTATION = "moecompress_packed"
_OWNER_ATTR = "_moecompress_packed_owner"
DEFAULT_PER_GROUP = 8  # routed experts held dense at once (Qwen3-30B-A3B: 8 x 18 MiB in float32)

# fill(target layer, experts): dequantise the layer's experts `experts` into local experts 0.. of `target`
ExpertFill = Callable[[MoELayerRef, Sequence[int]], None]


def _packed_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    adapter, layer = self.__dict__[_OWNER_ATTR]
    return adapter.run_experts(layer, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _packed_forward)


def supports_packed_experts(layer: MoELayerRef) -> bool:
    """Whether the layer's experts module dispatches through transformers' experts registry."""
    return hasattr(layer.experts, "config")


class PackedExperts:
    """The experts source of one MoE layer whose routed experts stay packed (see the module docstring)."""

    def __init__(self, scratch: MoELayerRef, fill: ExpertFill, per_group: int) -> None:
        self.scratch = scratch  # an experts module of `per_group` experts, weights on meta between calls
        self.fill = fill
        self.per_group = per_group
        self.dequantized = 0  # experts dequantised so far (a count over calls)

    @contextlib.contextmanager
    def _loaded(self, adapter: MoEAdapter, group: list[int]) -> Iterator[MoELayerRef]:
        self.fill(self.scratch, group)
        self.dequantized += len(group)
        try:
            yield self.scratch
        finally:
            release_experts(adapter, self.scratch)

    def run(self, adapter: MoEAdapter, layer: MoELayerRef, hidden: torch.Tensor, index: torch.Tensor,
            weights: torch.Tensor, visit: ExpertVisitor | None, only: set[int] | None) -> torch.Tensor:
        """`run_experts` of the layer: hidden (T, H), index/weights (T, k) -> (T, H), routed experts only."""
        routed = [e for e in sorted(set(torch.unique(index).tolist()))
                  if 0 <= e < layer.num_experts and (only is None or e in only)]
        groups = [routed[start:start + self.per_group] for start in range(0, len(routed), self.per_group)]
        return run_in_groups(adapter, layer, ExpertsCall(hidden, index, weights, visit, only), groups,
                             lambda group: self._loaded(adapter, group))


def release_experts(adapter: MoEAdapter, layer: MoELayerRef) -> None:
    """Put every routed-expert parameter of `layer` back on the meta device."""
    for name in adapter.expert_weight_names(layer):
        module_path, _, leaf = name.rpartition(".")
        module = layer.experts.get_submodule(module_path) if module_path else layer.experts
        current = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(torch.empty_like(current, device="meta"), requires_grad=False)


def scratch_layers(adapter: MoEAdapter, config: Any, per_group: int, dtype: torch.dtype) -> dict[int, MoELayerRef]:
    """MoE layer index -> an empty experts module of `per_group` experts built from `config` (meta weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(adapter.patched_config(config, num_experts=per_group), dtype=dtype)
    return {ref.index: ref for ref in adapter.moe_layers(skeleton)}


def install_packed_experts(adapter: MoEAdapter, layer: MoELayerRef, scratch: MoELayerRef, fill: ExpertFill,
                           per_group: int = DEFAULT_PER_GROUP) -> PackedExperts:
    """Make `layer`'s experts compute from packed weights (its fused weights go to the meta device)."""
    source = PackedExperts(scratch, fill, min(per_group, layer.num_experts))
    release_experts(adapter, layer)
    experts = layer.experts
    select_experts_implementation(experts, IMPLEMENTATION)
    experts.__dict__[_OWNER_ATTR] = (adapter, layer)
    experts.__dict__[EXPERT_SOURCE_ATTR] = source
    return source


def packed_sources(model: nn.Module) -> list[PackedExperts]:
    """The packed-experts sources installed on a model's experts modules (empty: dense experts)."""
    return [module.__dict__[EXPERT_SOURCE_ATTR] for module in model.modules()
            if isinstance(module.__dict__.get(EXPERT_SOURCE_ATTR), PackedExperts)]
