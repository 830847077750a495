"""`InputMoment`: the quadratic forms D_r H D_r^T from held rows and from the folded matrix are the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moecompress.export.gguf_moments import ROW_BLOCK, InputMoment, moment_bytes
from moecompress.export.gguf_sensitivity import busiest_expert_rows
from moecompress.models.adapters.base import RouterOutput

WIDTH = 24


def _explicit(x: torch.Tensor, c: torch.Tensor, delta: np.ndarray) -> np.ndarray:
    """D_r (sum_t c_t x_t x_t^T) D_r^T, written out in float64."""
    hessian = (x.double().T * c.double()) @ x.double()  # (in, in)
    d = torch.from_numpy(delta).double()
    return ((d @ hessian) * d).sum(1).numpy()


@pytest.mark.parametrize("tokens", [5, WIDTH, WIDTH + 1, 3 * WIDTH])
def test_forms_equal_the_explicit_moment_on_both_sides_of_the_crossover(tokens: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, WIDTH, generator=gen)  # (n, in) float32, as the model's inputs are
    c = torch.rand(tokens, generator=gen) + 0.1  # (n,)
    delta = torch.randn(7, WIDTH, generator=gen).numpy()  # D (R, in)
    moment = InputMoment(WIDTH)
    for start in range(0, tokens, 4):  # several batches, crossing over in the middle of one
        moment.add(x[start : start + 4], c[start : start + 4])
    assert moment.count == tokens
    expected = _explicit(x, c, delta)
    np.testing.assert_allclose(moment.row_forms(delta), expected, rtol=1e-12)
    assert moment.trace(delta) == pytest.approx(float(expected.sum()), rel=1e-12)
    np.testing.assert_allclose(moment.matrix().numpy(), (x.double().T * c.double()) @ x.double(), rtol=1e-12)


def test_unweighted_inputs_and_many_rows_of_delta() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, WIDTH, generator=gen)  # (B, S, in): flattened to 6 inputs
    delta = torch.randn(ROW_BLOCK + 5, WIDTH, generator=gen).numpy()  # more rows than one block
    moment = InputMoment(WIDTH)
    moment.add(x)
    np.testing.assert_allclose(moment.row_forms(delta), _explicit(x.reshape(-1, WIDTH), torch.ones(6), delta),
                               rtol=1e-12)


def test_an_empty_moment_costs_nothing() -> None:
    moment = InputMoment(WIDTH)
    assert moment.trace(np.ones((3, WIDTH))) == 0.0
    assert moment.matrix().abs().sum() == 0


def test_held_bytes_are_the_smaller_form() -> None:
    assert moment_bytes(7168, 192) == 8 * 7168 * 192  # a DeepSeek-V3 routed expert's inputs: rows
    assert moment_bytes(16384, 2048) == 8 * 16384 * 2048  # o_proj on 8 windows of 256 tokens: rows
    assert moment_bytes(64, 1000) == 8 * 64 * 64  # a narrow map on many tokens: the matrix


def test_busiest_expert_rows_counts_routed_tokens_over_batches() -> None:
    def routed(index: list[list[int]]) -> RouterOutput:
        ids = torch.tensor(index)
        return RouterOutput(logits=torch.zeros(len(index), 4), weights=torch.ones(ids.shape), index=ids)

    assert busiest_expert_rows([routed([[0, 1], [1, 2]]), routed([[1, 3]])], 4) == 3
    assert busiest_expert_rows([], 4) == 0
