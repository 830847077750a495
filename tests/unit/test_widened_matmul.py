"""Narrow weights times wide activations: the ordinary gradients, with only the narrow weight kept for backward."""

from __future__ import annotations

import pytest
import torch

from moecompress.models.widened_matmul import widened_matmul


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:  # noqa: ANN001
    """(fn's output, bytes of the tensors autograd saved while computing it)."""
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved)


@pytest.mark.parametrize("transposed", [False, True])
def test_gradients_equal_the_ordinary_product_and_only_the_narrow_weight_is_kept(transposed: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 32, dtype=torch.bfloat16)  # (out, in), or (in, out) when transposed
    x = torch.randn(5, 32 if not transposed else 48, requires_grad=True)
    grad = torch.randn(5, 48 if not transposed else 32)

    def ordinary() -> torch.Tensor:
        wide = weight.float()
        return x @ wide if transposed else torch.nn.functional.linear(x, wide)

    expected, ordinary_bytes = _saved_bytes(ordinary)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    got, widened_bytes = _saved_bytes(lambda: widened_matmul(x, weight, transposed))
    (got_grad,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)
    assert widened_bytes == weight.numel() * 2  # the bfloat16 weight, not its float32 copy
    assert ordinary_bytes >= weight.numel() * 4


def test_without_autograd_or_with_a_weight_that_needs_a_gradient_it_is_the_ordinary_product() -> None:
    weight = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    out = widened_matmul(x, weight)
    out.sum().backward()
    assert weight.grad is not None  # the ordinary path, so the weight's gradient exists
    with torch.no_grad():
        torch.testing.assert_close(widened_matmul(x, weight.bfloat16()), x @ weight.bfloat16().float().T)
