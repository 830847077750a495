"""Route an experts module through `MoEAdapter.run_experts` using transformers' own dispatch.

transformers 5 experts classes decorated with `@use_experts_implementation` look up their
forward in `ALL_EXPERTS_FUNCTIONS` by `config._experts_implementation`. We register one
implementation, ``"moecompress"``, and give each instrumented experts module a private copy of
its config that selects it. The model's block code (router call, shared experts, residual)
runs unchanged, and un-instrumented layers keep their usual implementation.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

if TYPE_CHECKING:
    from moecompress.models.adapters.base import ExpertVisitor, MoEAdapter, MoELayerRef

IMPLEMENTATION = "moecompress"
_RUNNER_ATTR = "_moecompress_runner"


def _instrumented_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    runner = self.__dict__.get(_RUNNER_ATTR)
    if runner is None:
        raise RuntimeError("experts module selected the moecompress implementation outside an instrument() context")
    return runner(hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _instrumented_forward)


def select_experts_implementation(experts: torch.nn.Module, name: str) -> Any:
    """Make `experts` compute with transformers' registered experts implementation `name`; returns its old config.

    The module gets a private copy of its config whose `_experts_implementation_internal` (the
    private field transformers' dispatch reads) names `name`, so other layers keep theirs;
    assigning the returned config back undoes it.
    """
    previous = experts.config
    private = copy.copy(previous)
    private._experts_implementation_internal = name
    experts.config = private
    return previous


def is_instrumented(experts: torch.nn.Module) -> bool:
    """Whether an experts module currently computes through `run_experts` (inside `instrumented_experts`)."""
    return _RUNNER_ATTR in experts.__dict__


@contextlib.contextmanager
def instrumented_experts(
    adapter: MoEAdapter, layers: Sequence[MoELayerRef], visitors: dict[int, ExpertVisitor]
) -> Iterator[None]:
    """Within the context, each layer's experts compute through `adapter.run_experts` with its visitor.

    A visitor may also have a `finish(hidden (T, H), index (T, k), weights (T, k), combined (T, H))`
    method, called once per experts call after every expert has been visited.
    """
    saved = []
    try:
        for layer in layers:
            experts = layer.experts
            if not hasattr(experts, "config"):
                raise RuntimeError(f"{type(experts).__name__} does not use transformers' experts dispatch")
            saved.append((experts, select_experts_implementation(experts, IMPLEMENTATION)))
            visit = visitors[layer.index]

            def runner(hidden, index, weights, _layer=layer, _visit=visit):
                combined = adapter.run_experts(_layer, hidden, index, weights, _visit)
                finish = getattr(_visit, "finish", None)
                if finish is not None:
                    finish(hidden, index, weights, combined)
                return combined

            experts.__dict__[_RUNNER_ATTR] = runner
        yield
    finally:
        for experts, config in saved:
            experts.config = config
            experts.__dict__.pop(_RUNNER_ATTR, None)
