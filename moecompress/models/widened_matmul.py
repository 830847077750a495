"""Matrix products with weights stored narrower than the activations, without keeping wide copies for backward.

The layer engine may keep routed experts in their stored dtype (bfloat16) while activations
compute in float32; `MoEAdapter.run_experts` widens one expert's weight at a time. Under
autograd (the layer-streamed backward pass) an ordinary `linear(x, w.float())` saves the
float32 copy for the backward pass, so every expert's widened copy of a layer lives until the
layer is backpropagated: twice the layer's bfloat16 bytes. Here the narrow weight is saved
and widened again in the backward pass:

    y = x W^T (or x W when transposed);   dL/dx = dL/dy W (or dL/dy W^T)

with W widened to the activations' dtype in both. The weight gets no gradient (the passes
that backpropagate freeze every parameter); a weight that requires one takes the ordinary path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _WidenedMatmul(torch.autograd.Function):
    """x (N, in) times a narrower weight, widened in forward and again in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.transposed = transposed
        wide = weight.to(x.dtype)
        return x @ wide if transposed else nn.functional.linear(x, wide)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        wide = weight.to(grad.dtype)
        return (grad @ wide.T if ctx.transposed else grad @ wide), None, None


def widened_matmul(x: torch.Tensor, weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """x W^T for a weight (out, in), or x W for a transposed weight (in, out), in x's dtype: (N, in) -> (N, out)."""
    if weight.dtype == x.dtype or weight.requires_grad or not (torch.is_grad_enabled() and x.requires_grad):
        wide = weight.to(x.dtype)
        return x @ wide if transposed else nn.functional.linear(x, wide)
    return _WidenedMatmul.apply(x, weight, transposed)
