"""Passes over one decoder layer's cached inputs, and the statistics gathered on the way.

* `run_cached(runner, index)`: push every cached batch through decoder layer `index` without
  replacing the cached inputs (the Hessian passes before the layer is quantised);
* `LinearHessians`: forward pre-hooks on `nn.Linear` targets that feed their inputs to GPTQ;
* `ExpertHessians`: an expert visitor (`MoEAdapter.run_experts`) that feeds each routed
  expert's tokens x (for gate and up) and activations (for down) to GPTQ, optionally weighted
  by the tokens' gate values (MoEQuant's affinity-guided Hessian);
* `expert_chunks`: groups of experts whose per-expert state (Hessians, candidate copies) fits
  a memory limit. An expert's inputs do not depend on the other experts' weights (routers are
  never quantised), so processing a layer's experts in several groups gives the same result
  as one;
* `record_block_inputs` / `visit_recorded`: run a layer once, keeping what its MoE block
  received, then compute any group of experts on those inputs (routed by the layer's own
  router) with a visitor, so each group costs its own experts' arithmetic, not a layer pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from moecompress.engine.layers import LayerEngine
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef, RouterOutput
from moecompress.quant.gptq import GPTQ

# bytes of per-expert state (Hessians, candidate copies) held for one MoE layer at a time: at Qwen3-30B-A3B shapes
# 512 MiB holds 26 experts' GPTQ Hessians or 7 experts' sensitivity candidates. More groups add no layer pass: each
# group computes only its own experts on the layer's recorded tokens.
DEFAULT_EXPERT_MEMORY = 512 * 2**20


def expert_chunks(experts: Sequence[int], bytes_per_expert: int, limit: int = DEFAULT_EXPERT_MEMORY
                  ) -> list[list[int]]:
    """Consecutive groups of `experts` holding at most `limit` bytes of per-expert state (>= 1 expert each)."""
    size = max(1, limit // max(bytes_per_expert, 1))
    experts = list(experts)
    return [experts[i : i + size] for i in range(0, len(experts), size)]


def hessian_bytes(hidden: int, intermediate: int) -> int:
    """float32 Hessians of one expert: H x H (gate/up inputs) and I x I (down inputs)."""
    return 4 * (hidden * hidden + intermediate * intermediate)


class _StopForward(Exception):
    """Raised by a pre-hook to end a layer's forward early (what follows is not needed)."""


@torch.no_grad()
def run_cached(runner: LayerEngine, index: int, stop_at: Sequence[nn.Module] = ()) -> None:
    """Run decoder layer `index` on every cached batch, discarding the outputs.

    Mirrors `LayerEngine.run_layer` (same inputs and keyword arguments) but leaves the
    cached hidden states and the runner's position unchanged. With `stop_at`, each batch's
    forward ends as soon as one of those modules is about to run: the statistics passes of
    attention do not need the MLP that follows it.
    """
    def stop(module: nn.Module, args: tuple) -> None:
        raise _StopForward

    handles = [module.register_forward_pre_hook(stop) for module in stop_at]
    try:
        with runner.layer_loaded(index) as layer:
            for batch in runner.batches:
                try:
                    runner.layer_call(index, batch, layer)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def record_block_inputs(runner: LayerEngine, ref: MoELayerRef, index: int, advance: bool
                        ) -> list[tuple[torch.Tensor, RouterOutput]]:
    """Run decoder layer `index` on every cached batch and keep its MoE block's input (T, H) and routing.

    advance: also make the layer's outputs the next layer's inputs (`run_layer`), else leave
    the cache as it is (`run_cached`).
    """
    recorded: list[tuple[torch.Tensor, RouterOutput]] = []

    def record(module: nn.Module, args: tuple) -> None:
        hidden = args[0].detach()
        flat = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
        recorded.append((flat, runner.adapter.route(ref, flat)))

    handle = ref.block.register_forward_pre_hook(record)
    try:
        if advance:
            runner.run_layer(index)
        else:
            run_cached(runner, index)
    finally:
        handle.remove()
    return recorded


@torch.no_grad()
def visit_recorded(adapter: MoEAdapter, ref: MoELayerRef, inputs: list[tuple[torch.Tensor, RouterOutput]],
                   visit: Any, experts: Sequence[int]) -> None:
    """Compute `experts` on their recorded tokens, calling `visit` as a forward through the block would."""
    for flat, routed in inputs:
        adapter.run_experts(ref, flat, routed.index, routed.weights, visit, only=set(experts))


class LinearHessians:
    """GPTQ statistics of the inputs of several `nn.Linear` modules, gathered with pre-hooks."""

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.modules = modules
        self.stats = {name: GPTQ(module.in_features) for name, module in modules.items()}

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """Within the context, every forward of a watched module adds its input to its statistics."""
        handles = []
        try:
            for name, module in self.modules.items():
                stats = self.stats[name]

                def hook(mod: nn.Module, args: tuple, _stats: GPTQ = stats) -> None:
                    _stats.add_batch(args[0])

                handles.append(module.register_forward_pre_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()


class ExpertHessians:
    """Per routed expert: GPTQ statistics of its inputs (gate/up) and activations (down)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, experts: Sequence[int] | None = None,
                 weighted: bool = False) -> None:
        wanted = range(num_experts) if experts is None else experts
        self.inputs = {e: GPTQ(hidden) for e in wanted}
        self.activations = {e: GPTQ(intermediate) for e in wanted}
        self.weighted = weighted

    def tokens(self, expert: int) -> int:
        """Tokens routed to `expert` so far."""
        return self.inputs[expert].tokens if expert in self.inputs else 0

    def __call__(self, expert: int, token_idx: torch.Tensor, slot: torch.Tensor, x: torch.Tensor,
                 act: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> None:
        if expert not in self.inputs:
            return
        weight = gate.detach().float() if self.weighted else None
        self.inputs[expert].add_batch(x, weight)
        self.activations[expert].add_batch(act, weight)
