"""A condensed MoE layer as one dense MLP.

Condense, Don't Just Prune: Enhancing Efficiency and Performance in MoE Layer Pruning
(Cao et al., arXiv 2412.00069). A condensed layer has no routing: every token goes through a
fixed set S of routed experts with fixed weights, plus the shared experts,

    y(x) = sum_{e in S} wbar_e f_e(x) + shared(x),

    wbar_e = (sum_{t routed to e} g_{e,t}) / N_e     (mean gate of e over its routed tokens,
                                                      = soft_count / count of the observer)

Exactness exploited here: each routed expert is f_e(x) = D_e act(G_e x + b^G_e, U_e x + b^U_e) + b^D_e
with an elementwise `act` (SwiGLU silu(g) * u, GPT-OSS's clamped variant, or act(u) for
non-gated experts) that is the same for every expert of a layer. So, with fixed weights,

    sum_e wbar_e f_e(x) = [wbar_1 D_1 | ... | wbar_m D_m] act([G_1; ...; G_m] x + [b^G], [U_1; ...; U_m] x + [b^U])
                          + sum_e wbar_e b^D_e,

ONE dense MLP whose gate and up rows are the experts' rows concatenated and whose down columns
are the experts' columns scaled by wbar_e. Appending zero neurons (zero gate/up rows and zero
down columns) adds act(0, 0) times a zero column: nothing, so padding to a wider size is exact.

`CondensedExperts` is that dense MLP with the interface of a transformers experts module
(hidden, top_k_index, top_k_weights) -> (T, H): it ignores the routing arguments, so it can
stand in for a block's experts module while the block's own code (shared experts, their gates,
residual handling) runs unchanged around it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import CanonicalExpert, MoEAdapter, MoELayerRef

Activation = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


@dataclass
class DenseMLPWeights:
    """A dense (gated or not) MLP in nn.Linear convention: down(act(gate x + bg, up x + bu)) + bd."""

    gate: torch.Tensor | None  # (I, H)
    up: torch.Tensor  # (I, H)
    down: torch.Tensor  # (H, I)
    gate_bias: torch.Tensor | None = None  # (I,)
    up_bias: torch.Tensor | None = None  # (I,)
    down_bias: torch.Tensor | None = None  # (H,)
    act: Activation | None = field(default=None, repr=False)

    @property
    def width(self) -> int:
        """Intermediate size (number of neurons)."""
        return int(self.up.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """MLP output for x (N, H) -> (N, H)."""
        return CanonicalExpert(self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias,
                               self.act).forward(x)


def check_condensable(adapter: MoEAdapter, layer: MoELayerRef) -> None:
    """Raise `MoecompressError` when the layer's experts cannot be condensed into one dense MLP."""
    if not any(module is layer.experts for module in layer.block.modules()):
        raise MoecompressError(
            f"{type(adapter).__name__}: the experts of layer {layer.index} are not a module of the MoE block "
            "with the (hidden, index, weights) interface (e.g. Llama 4 scales expert inputs by the router score); "
            "condensing is not supported for this architecture"
        )
    if getattr(layer.experts, "has_post_expert_norm", False):
        raise MoecompressError(
            f"layer {layer.index}: experts apply a norm after down_proj, so a weighted sum of experts is not one "
            "dense MLP; condensing is not supported for this architecture"
        )


def concatenate_experts(
    experts: Sequence[CanonicalExpert], weights: Sequence[float], dtype: torch.dtype = torch.float32
) -> DenseMLPWeights:
    """The dense MLP equal to sum_e weights[e] * experts[e](x) (see the module docstring).

    Gate/up rows and biases are concatenated in the given order; down columns are scaled by
    the expert's weight; down biases are summed with the weights. Computed in `dtype`.
    """
    if len(experts) != len(weights):
        raise ValueError("one weight per expert")
    if not experts:
        raise MoecompressError("a condensed layer needs at least one routed expert")
    gated = {e.gate is not None for e in experts}
    if len(gated) != 1:
        raise ValueError("experts mix gated and non-gated MLPs")

    def cat(parts: list[torch.Tensor | None], dim: int = 0) -> torch.Tensor | None:
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise ValueError("some experts have a bias and others do not")
        return torch.cat([p.detach().to(dtype) for p in parts], dim=dim)

    down_cols = [e.down.detach().to(dtype) * float(w) for e, w in zip(experts, weights)]  # (H, I_e) each
    down_bias = None
    if experts[0].down_bias is not None:
        down_bias = sum(e.down_bias.detach().to(dtype) * float(w) for e, w in zip(experts, weights))  # (H,)
    return DenseMLPWeights(
        gate=cat([e.gate for e in experts]),  # (sum I_e, H)
        up=cat([e.up for e in experts]),  # (sum I_e, H)
        down=torch.cat(down_cols, dim=1),  # (H, sum I_e)
        gate_bias=cat([e.gate_bias for e in experts]),
        up_bias=cat([e.up_bias for e in experts]),
        down_bias=down_bias,
        act=experts[0].act,
    )


def append_mlp(first: DenseMLPWeights, second: DenseMLPWeights) -> DenseMLPWeights:
    """The dense MLP computing first(x) + second(x) (same activation): neurons of both, biases added."""
    def cat(a: torch.Tensor | None, b: torch.Tensor | None, dim: int = 0) -> torch.Tensor | None:
        if a is None and b is None:
            return None
        if a is None or b is None:
            raise MoecompressError("cannot join an MLP with biases to one without")
        return torch.cat([a, b.to(a.dtype)], dim=dim)

    if (first.gate is None) != (second.gate is None):
        raise MoecompressError("cannot join a gated MLP to a non-gated one")
    down_bias = first.down_bias
    if second.down_bias is not None:
        down_bias = second.down_bias.to(first.down.dtype) if down_bias is None else down_bias + second.down_bias
    return DenseMLPWeights(
        gate=cat(first.gate, second.gate),
        up=cat(first.up, second.up),
        down=cat(first.down, second.down, dim=1),
        gate_bias=cat(first.gate_bias, second.gate_bias),
        up_bias=cat(first.up_bias, second.up_bias),
        down_bias=down_bias,
        act=first.act,
    )


def pad_neurons(mlp: DenseMLPWeights, width: int) -> DenseMLPWeights:
    """`mlp` widened to `width` neurons with zero gate/up rows and zero down columns (exact)."""
    extra = width - mlp.width
    if extra < 0:
        raise ValueError(f"cannot pad an MLP of width {mlp.width} down to {width}")
    if extra == 0:
        return mlp

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return torch.cat([t, t.new_zeros((extra,) + tuple(t.shape[1:]))], dim=0)

    return DenseMLPWeights(
        gate=rows(mlp.gate),
        up=rows(mlp.up),
        down=torch.cat([mlp.down, mlp.down.new_zeros(mlp.down.shape[0], extra)], dim=1),
        gate_bias=rows(mlp.gate_bias),
        up_bias=rows(mlp.up_bias),
        down_bias=mlp.down_bias,
        act=mlp.act,
    )


def condense_layer(adapter: MoEAdapter, layer: MoELayerRef, experts: Sequence[int], weights: Sequence[float],
                   dtype: torch.dtype = torch.float32) -> DenseMLPWeights:
    """The dense MLP equal to sum_{e in experts} weights[e] f_e for one MoE layer (fixed-weight form)."""
    check_condensable(adapter, layer)
    bad = [e for e in experts if not 0 <= int(e) < layer.num_experts]
    if bad:
        raise MoecompressError(f"layer {layer.index} has experts 0..{layer.num_experts - 1}; got {bad}")
    canonical = [adapter.expert_weights(layer, int(e)) for e in experts]
    return concatenate_experts(canonical, weights, dtype=dtype)


@dataclass(frozen=True)
class CondensedShape:
    """What a condensed MLP's tensors are: its width, the model's hidden size, and which optional tensors it has."""

    width: int  # I
    hidden_size: int  # H
    gated: bool
    gate_bias: bool = False
    up_bias: bool = False
    down_bias: bool = False

    @classmethod
    def of(cls, mlp: DenseMLPWeights) -> CondensedShape:
        """The shape of a dense MLP's weights."""
        return cls(mlp.width, int(mlp.up.shape[1]), mlp.gate is not None, mlp.gate_bias is not None,
                   mlp.up_bias is not None, mlp.down_bias is not None)


class CondensedExperts(nn.Module):
    """A dense MLP standing in for a block's routed-experts module; the routing arguments are ignored.

    Parameters: `up` (I, H), `down` (H, I), optional `gate` (I, H) and biases. `act` is the
    experts' own elementwise gating function (taken from the adapter's canonical experts).
    """

    def __init__(self, shape: CondensedShape, act: Activation, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        kw: dict[str, Any] = dict(dtype=dtype, device=device)
        width, hidden = shape.width, shape.hidden_size
        self.gate = nn.Parameter(torch.empty(width, hidden, **kw), requires_grad=False) if shape.gated else None
        self.up = nn.Parameter(torch.empty(width, hidden, **kw), requires_grad=False)
        self.down = nn.Parameter(torch.empty(hidden, width, **kw), requires_grad=False)
        self.gate_bias = nn.Parameter(torch.empty(width, **kw), requires_grad=False) if shape.gate_bias else None
        self.up_bias = nn.Parameter(torch.empty(width, **kw), requires_grad=False) if shape.up_bias else None
        self.down_bias = nn.Parameter(torch.empty(hidden, **kw), requires_grad=False) if shape.down_bias else None
        self.__dict__["act"] = act  # a plain callable, not a submodule or state

    @classmethod
    def from_weights(cls, mlp: DenseMLPWeights, dtype: torch.dtype | None = None) -> CondensedExperts:
        """A module holding `mlp`'s tensors (cast to `dtype`, default: their own)."""
        assert mlp.act is not None
        dtype = dtype or mlp.up.dtype
        module = cls(CondensedShape.of(mlp), mlp.act, dtype=dtype, device=mlp.up.device)
        with torch.no_grad():
            for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
                value = getattr(mlp, name)
                if value is not None:
                    getattr(module, name).copy_(value.to(dtype))
        return module

    @property
    def width(self) -> int:
        """Intermediate size (number of neurons)."""
        return int(self.up.shape[0])

    def weights(self) -> DenseMLPWeights:
        """The module's tensors as `DenseMLPWeights` (views)."""
        return DenseMLPWeights(self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias, self.act)

    def forward(self, hidden_states: torch.Tensor, *routing: Any, **routing_kwargs: Any) -> torch.Tensor:
        """Dense MLP output for hidden (T, H) -> (T, H); router index/weights, if given, are ignored."""
        up = nn.functional.linear(hidden_states, self.up, self.up_bias)
        gate = None if self.gate is None else nn.functional.linear(hidden_states, self.gate, self.gate_bias)
        return nn.functional.linear(self.act(gate, up), self.down, self.down_bias)

    def extra_repr(self) -> str:
        return f"width={self.width}, hidden={self.up.shape[1]}, gated={self.gate is not None}"


def experts_child_path(layer: MoELayerRef) -> str:
    """Dotted path of the experts module inside its block."""
    for name, module in layer.block.named_modules():
        if module is layer.experts:
            return name
    raise MoecompressError(f"layer {layer.index}: experts are not a module of the MoE block")


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at dotted `path` under `root`; returns the module it replaced."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, leaf)
    setattr(parent, leaf, new)
    return old
