"""How unfused expert projections are laid out in GPTQ checkpoints, for every fused layout.

GPTQModel (through defuser) unfuses an experts module's `gate_up_proj` by cutting its
intermediate axis into two halves, named `gate_proj` (first half) and `up_proj` (second half),
and rebuilds the fused activation input by concatenating them. For concatenated layouts
(most architectures) the halves are the true gate and up maps. For interleaved layouts
(GPT-OSS: rows g0, u0, g1, u1, ...) each half mixes gate and up rows, and a checkpoint must
store those halves under those names to load in GPTQModel.

moecompress quantises the canonical gate and up maps (rows are quantised independently, so
this gives the same codes, scales and zeros per row) and converts here: `to_checkpoint_halves`
for writing, `from_checkpoint_halves` for reading.
"""

from __future__ import annotations

import torch

from moecompress.models.adapters.base import MoELayerRef
from moecompress.quant.spec import QuantizedWeight


def interleaved_gate_up(layer: MoELayerRef) -> bool:
    """True when the layer's fused gate/up rows alternate gate, up (GPT-OSS)."""
    experts = layer.experts
    return bool(getattr(experts, "has_gate", True)) and not bool(getattr(experts, "is_concatenated", True))


def select_rows(q: QuantizedWeight, rows: torch.Tensor) -> QuantizedWeight:
    """The quantised weight of a subset (or reordering) of output rows."""
    return QuantizedWeight(q.codes[rows].contiguous(), q.scales[:, rows].contiguous(), q.zeros[:, rows].contiguous(),
                           q.g_idx, q.bits, q.group_size, q.sym)


def cat_rows(first: QuantizedWeight, second: QuantizedWeight) -> QuantizedWeight:
    """Stack two quantised weights with equal grids and g_idx along the output axis."""
    if not torch.equal(first.g_idx, second.g_idx) or first.bits != second.bits:
        raise ValueError("gate and up must share bits and g_idx to be stored as fused halves")
    return QuantizedWeight(torch.cat([first.codes, second.codes]), torch.cat([first.scales, second.scales], dim=1),
                           torch.cat([first.zeros, second.zeros], dim=1), first.g_idx, first.bits, first.group_size,
                           first.sym)


def _interleave_order(width: int) -> torch.Tensor:
    """Row order turning [gate rows; up rows] (2I) into g0, u0, g1, u1, ..."""
    return torch.stack([torch.arange(width), torch.arange(width) + width], dim=1).flatten()


def to_checkpoint_halves(gate: QuantizedWeight, up: QuantizedWeight) -> tuple[QuantizedWeight, QuantizedWeight]:
    """Canonical gate and up (I rows each) -> the two halves of the interleaved fused rows."""
    width = gate.codes.shape[0]
    fused = select_rows(cat_rows(gate, up), _interleave_order(width))
    return select_rows(fused, torch.arange(width)), select_rows(fused, torch.arange(width, 2 * width))


def tensor_halves(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same conversion for plain weights (I, H) or biases (I,)."""
    width = gate.shape[0]
    fused = torch.cat([gate, up])[_interleave_order(width)]
    return fused[:width].contiguous(), fused[width:].contiguous()


def from_checkpoint_halves(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `tensor_halves`: the two stored halves -> canonical (gate, up)."""
    fused = torch.cat([first, second])
    return fused[0::2].contiguous(), fused[1::2].contiguous()
