"""GPTQ and RTN on synthetic linear maps: GPTQ beats RTN on correlated inputs, edge cases behave."""

from __future__ import annotations

import pytest
import torch

from moecompress.quant.gptq import GPTQ
from moecompress.quant.rtn import quantize_rtn
from moecompress.quant.spec import QuantSpec


def correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """Inputs (n, dim) with strongly correlated features (a low-rank mix plus small noise)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim // 4, dim, generator=gen)
    return torch.randn(n, dim // 4, generator=gen) @ mix + 0.05 * torch.randn(n, dim, generator=gen)


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(((x @ weight.T - x @ approx.T) ** 2).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(32, False), (-1, False), (32, True)])
def test_gptq_beats_rtn_on_correlated_inputs(bits: int, group_size: int, act_order: bool) -> None:
    x = correlated_inputs(512, 96, seed=bits)
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(7))
    spec = QuantSpec(bits=bits, group_size=group_size, act_order=act_order)
    gptq = GPTQ(96)
    for chunk in x.split(100):
        gptq.add_batch(chunk)
    result = gptq.quantize(weight, spec)
    rtn = quantize_rtn(weight, spec)
    assert result.weight.codes.max() <= 2**bits - 1
    assert output_error(x, weight, result.weight.dequantize()) < 0.8 * output_error(x, weight, rtn.dequantize())


def test_act_order_records_groups_by_visiting_order() -> None:
    x = correlated_inputs(256, 64, seed=3) * torch.linspace(0.1, 3.0, 64)
    gptq = GPTQ(64)
    gptq.add_batch(x)
    result = gptq.quantize(torch.randn(8, 64), QuantSpec(bits=4, group_size=16, act_order=True))
    g_idx = result.weight.g_idx
    assert sorted(torch.bincount(g_idx.long()).tolist()) == [16, 16, 16, 16]
    assert not torch.equal(g_idx, torch.arange(64, dtype=torch.int32) // 16)  # permuted
    assert int(g_idx[63]) == 0  # largest-variance column is visited first


@pytest.mark.parametrize("group_size,block_size", [(32, 128), (48, 64), (-1, 40)])
def test_gptq_equals_rtn_with_uncorrelated_unit_inputs(group_size: int, block_size: int) -> None:
    """With H proportional to I nothing is propagated: GPTQ is exactly RTN (groups across blocks too)."""
    gptq = GPTQ(96)
    gptq.hessian = 3.0 * torch.eye(96)
    gptq.total_weight, gptq.tokens = 1.0, 1000
    weight = torch.randn(24, 96, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits=3, group_size=group_size)
    result = gptq.quantize(weight, spec, block_size=block_size)
    rtn = quantize_rtn(weight, spec)
    assert torch.equal(result.weight.codes, rtn.codes)
    assert torch.equal(result.weight.scales, rtn.scales)


def test_dead_inputs_are_zeroed() -> None:
    x = correlated_inputs(128, 32, seed=0)
    x[:, 5] = 0.0
    gptq = GPTQ(32)
    gptq.add_batch(x)
    result = gptq.quantize(torch.randn(4, 32) + 1.0, QuantSpec(bits=4, group_size=-1))
    assert torch.all(result.weight.dequantize()[:, 5] == 0)


def test_damping_is_raised_until_cholesky_succeeds() -> None:
    gptq = GPTQ(4)
    gptq.hessian = torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.5]))  # indefinite: plain damping fails
    gptq.total_weight, gptq.tokens = 1.0, 10
    result = gptq.quantize(torch.randn(3, 4), QuantSpec(bits=4, group_size=-1, damp=0.01))
    assert result.damp > 0.01
    assert torch.isfinite(result.weight.dequantize()).all()


def test_token_weights_scale_each_tokens_contribution() -> None:
    """MoEQuant weighting: a zero-weight token contributes nothing; weights act as multiplicities."""
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    weighted = GPTQ(8)
    weighted.add_batch(x, token_weight=torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 1.0]))
    plain = GPTQ(8)
    plain.add_batch(torch.cat([x[[0, 2, 2, 4, 5]]]))
    assert torch.allclose(weighted.hessian, plain.hessian, atol=1e-6)
    assert weighted.tokens == 6


def test_running_mean_matches_single_batch() -> None:
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    one, many = GPTQ(16), GPTQ(16)
    one.add_batch(x)
    for chunk in x.split(7):
        many.add_batch(chunk)
    assert torch.allclose(one.hessian, many.hessian, atol=1e-5)
    assert torch.allclose(one.hessian, 2 * x.T @ x / 50, atol=1e-5)


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_within_half_a_step(sym: bool) -> None:
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    q = quantize_rtn(weight, QuantSpec(bits=4, group_size=16, sym=sym))
    step = q.scales.float()[q.g_idx.long()].T  # (out, in)
    # half a step, up to the fp16 rounding of the stored scale (the grid edge is 7.5 steps away)
    assert torch.all((weight - q.dequantize()).abs() <= step / 2 * 1.01)
    if sym:
        assert torch.all(q.zeros == 8)


def test_storage_bits_count_scales_zeros_and_g_idx() -> None:
    spec = QuantSpec(bits=4, group_size=128)
    bits = spec.storage_bits(4096, 4096)
    # 4 + 16/128 (scales) + 4/128 (zeros) + 32/4096 (g_idx)
    assert bits == pytest.approx(4 + 16 / 128 + 4 / 128 + 32 / 4096)


@pytest.mark.parametrize("act_order", [False, True])
def test_batched_solve_equals_solving_each_map_alone(act_order: bool) -> None:
    """Maps solved together get exactly their own results, damping raised only where it must be."""
    from moecompress.quant.gptq import gptq_batched

    hessians, weights = [], []
    for seed in range(3):
        x = correlated_inputs(200, 48, seed=seed) * torch.linspace(0.2, 2.0, 48)
        x[:, seed] = 0.0  # a different dead input per map
        stats = GPTQ(48)
        stats.add_batch(x)
        hessians.append(stats.hessian)
        weights.append(torch.randn(20, 48, generator=torch.Generator().manual_seed(10 + seed)))
    indefinite = torch.eye(48)
    indefinite[7, 7] = -1.5  # needs raised damping
    hessians.append(indefinite)
    weights.append(torch.randn(20, 48, generator=torch.Generator().manual_seed(20)))
    spec = QuantSpec(bits=3, group_size=16, act_order=act_order)
    together = gptq_batched(torch.stack(weights), torch.stack(hessians), spec, block_size=32)
    for weight, hessian, batched in zip(weights, hessians, together):
        alone = GPTQ(48)
        alone.hessian, alone.total_weight, alone.tokens = hessian.clone(), 1.0, 100
        single = alone.quantize(weight, spec, block_size=32)
        assert torch.equal(batched.weight.codes, single.weight.codes)
        assert torch.equal(batched.weight.scales, single.weight.scales)
        assert torch.equal(batched.weight.g_idx, single.weight.g_idx)
        assert batched.damp == single.damp
        assert batched.loss == pytest.approx(single.loss, rel=1e-9)
    assert [r.damp for r in together[:3]] == [0.01] * 3 and together[3].damp > 0.01


def _with_hessian(hessian: torch.Tensor) -> GPTQ:
    stats = GPTQ(hessian.shape[0])
    stats.hessian, stats.total_weight, stats.tokens = hessian.clone(), 1.0, 100
    return stats


@pytest.mark.parametrize("group_size", [20, 24])  # 24: 4 groups of 24 and a shorter last one of 4
def test_group_aware_order_with_a_diagonal_hessian_equals_rtn(group_size: int) -> None:
    """Diagonal H: nothing is propagated, so any visiting order gives RTN; with GAR the groups are visited
    out of order, so this checks that every group's scale and zero land back at its own index."""
    diag = torch.rand(100, generator=torch.Generator().manual_seed(0)) + 0.1
    weight = torch.randn(12, 100, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits=3, group_size=group_size, group_aware=True)
    result = _with_hessian(torch.diag(diag)).quantize(weight, spec)
    rtn = quantize_rtn(weight, spec)
    assert torch.equal(result.weight.codes, rtn.codes)
    assert torch.equal(result.weight.scales, rtn.scales) and torch.equal(result.weight.zeros, rtn.zeros)
    assert torch.equal(result.weight.g_idx, torch.arange(100, dtype=torch.int32) // group_size)  # sequential


def test_group_aware_order_keeps_groups_together() -> None:
    from moecompress.quant.gptq import group_aware_order

    diag = torch.tensor([[1.0, 5.0, 2.0, 9.0, 3.0, 0.5, 4.0]])  # groups of 3: {0,1,2} {3,4,5} and a short {6}
    order, groups = group_aware_order(diag, 3)
    assert order.tolist() == [[3, 4, 5, 1, 2, 0, 6]]  # group 1 (max 9) first, by decreasing diagonal inside
    assert groups.tolist() == [[1, 0, 2]]


def test_group_aware_order_is_act_order_with_one_group() -> None:
    """Per channel (one group per row) GAR visits columns exactly as act-order does."""
    scales = torch.linspace(0.1, 3.0, 64)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    x = correlated_inputs(256, 64, seed=4) * scales
    stats = GPTQ(64)
    stats.add_batch(x)
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    gar = stats.quantize(weight, QuantSpec(bits=2, group_size=-1, group_aware=True))
    act = stats.quantize(weight, QuantSpec(bits=2, group_size=-1, act_order=True))
    plain = stats.quantize(weight, QuantSpec(bits=2, group_size=-1, group_aware=False))
    assert torch.equal(gar.weight.codes, act.weight.codes) and torch.equal(gar.weight.scales, act.weight.scales)
    assert not torch.equal(gar.weight.codes, plain.weight.codes)
    assert gar.loss < plain.loss
