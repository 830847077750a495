"""The uniform quantisation grid and round-to-nearest (RTN), the baseline GPTQ is measured against.

For a set of weights w (one output row, one group of input columns), with maxq = 2^bits - 1:

    asymmetric:  lo = min(w, 0), hi = max(w, 0), scale = (hi - lo) / maxq, zero = round(-lo / scale)
    symmetric:   m = max(|lo|, hi), scale = 2 m / maxq,                     zero = (maxq + 1) / 2
    q = clamp(round(w / scale) + zero, 0, maxq),   w_hat = scale * (q - zero)

(the grid of GPTQ, arXiv 2210.17323, and of the GPTQ checkpoint format). The range always
contains 0; an all-zero group gets lo = -1, hi = 1. Scales are rounded to float16 before use
because that is how the checkpoint stores them. One bit has no useful symmetric grid
({-s, 0}), so 1-bit grids are always asymmetric.
"""

from __future__ import annotations

import torch

from moecompress.quant.spec import QuantizedWeight, QuantSpec

_FP16_TINY = torch.finfo(torch.float16).tiny


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable float32) and integer zero per row of w (rows, cols) -> (rows,), (rows,)."""
    maxq = 2**bits - 1
    sym = sym and bits > 1
    w = w.float()
    lo = torch.clamp(w.amin(dim=1), max=0.0)  # (rows,)
    hi = torch.clamp(w.amax(dim=1), min=0.0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, torch.full_like(lo, -1.0), lo)
    hi = torch.where(empty, torch.full_like(hi, 1.0), hi)
    scale = ((hi - lo) / maxq).clamp(min=_FP16_TINY).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of w (rows, cols) on the grid (scale, zero) given per row (rows,) -> (rows, cols) float."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(w.float() / scale[:, None]) + zero[:, None], 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale * (q - zero), per row."""
    return scale[:, None] * (q - zero[:, None])


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantisation of weight (out, in) with per-group scales and zeros."""
    out_features, in_features = weight.shape
    group = spec.effective_group(in_features)
    num_groups = -(-in_features // group)
    w = weight.detach().float()
    device = weight.device
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=device)
    scales = torch.empty(num_groups, out_features, dtype=torch.float16, device=device)
    zeros = torch.empty(num_groups, out_features, dtype=torch.int32, device=device)
    for g in range(num_groups):
        cols = slice(g * group, min((g + 1) * group, in_features))
        scale, zero = grid_params(w[:, cols], spec.bits, spec.sym)
        codes[:, cols] = quantize_codes(w[:, cols], scale, zero, spec.bits).to(torch.uint8)
        scales[g] = scale.half()
        zeros[g] = zero.to(torch.int32)
    g_idx = (torch.arange(in_features, device=device) // group).to(torch.int32)
    return QuantizedWeight(codes, scales, zeros, g_idx, spec.bits, group, spec.sym and spec.bits > 1)
