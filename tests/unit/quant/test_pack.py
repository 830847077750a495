"""GPTQ int32 packing: exact round trips for every bit-width and the documented word layout."""

from __future__ import annotations

import pytest
import torch

from moecompress.quant.pack import from_gptq_tensors, pack_cols, pack_rows, to_gptq_tensors, unpack_cols, unpack_rows
from moecompress.quant.rtn import quantize_rtn
from moecompress.quant.spec import QuantSpec


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [32, 64, 96, 45])
def test_pack_rows_round_trip(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + n)
    values = torch.randint(0, 2**bits, (n, 7), generator=gen)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (-(-n * bits // 32), 7)
    assert torch.equal(unpack_rows(packed, bits, n), values)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_cols_round_trip(bits: int) -> None:
    values = torch.randint(0, 2**bits, (5, 64), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(unpack_cols(pack_cols(values, bits), bits, 64), values)


def test_four_bit_word_layout() -> None:
    """Eight 4-bit values per word, the first in the lowest nibble; all-ones gives -1 as int32."""
    values = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [8]])
    assert int(pack_rows(values, 4)[0, 0]) == 0x87654321 - 2**32
    assert int(pack_rows(torch.full((8, 1), 15), 4)[0, 0]) == -1
    assert int(pack_rows(torch.full((8, 1), 7), 4)[0, 0]) == 0x77777777


def test_three_bit_word_layout() -> None:
    """32 values in 3 words; value 10 spans words 0/1 (2 + 1 bits), value 21 spans words 1/2 (1 + 2 bits)."""
    values = torch.zeros(32, 1, dtype=torch.long)
    values[10] = 0b111
    words = pack_rows(values, 3).to(torch.int64) & 0xFFFFFFFF
    assert words[:, 0].tolist() == [0b11 << 30, 0b1, 0]
    values = torch.zeros(32, 1, dtype=torch.long)
    values[21] = 0b110
    words = pack_rows(values, 3).to(torch.int64) & 0xFFFFFFFF
    assert words[:, 0].tolist() == [0, 0, 0b11]
    values = torch.zeros(32, 1, dtype=torch.long)
    values[11] = 0b101
    words = pack_rows(values, 3).to(torch.int64) & 0xFFFFFFFF
    assert words[:, 0].tolist() == [0, 0b101 << 1, 0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_tensors_round_trip(bits: int, sym: bool) -> None:
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(bits))
    q = quantize_rtn(weight, QuantSpec(bits=bits, group_size=32, sym=sym))
    offset = 1 if sym else 0
    tensors = to_gptq_tensors(q, zero_offset=offset)
    assert tensors["qweight"].shape == (64 * bits // 32, 48)
    assert tensors["qzeros"].shape == (2, -(-48 * bits // 32))
    assert tensors["scales"].shape == (2, 48) and tensors["scales"].dtype == torch.float16
    back = from_gptq_tensors(tensors, bits, 48, 64, sym, zero_offset=offset)
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(back.zeros, q.zeros)
    assert torch.equal(back.dequantize(), q.dequantize())


def test_v1_refuses_zero_point_zero() -> None:
    weight = torch.rand(4, 32) + 0.1  # all positive: asymmetric zero point is 0
    q = quantize_rtn(weight, QuantSpec(bits=4, group_size=-1, sym=False))
    assert int(q.zeros.min()) == 0
    with pytest.raises(ValueError, match="v2"):
        to_gptq_tensors(q, zero_offset=1)


@pytest.fixture(scope="module")
def gptqmodel_modules():  # noqa: ANN201
    """GPTQModel's torch quant-linear and v1->v2 conversion; the environment variables its import sets are undone."""
    import importlib.util
    import os

    if importlib.util.find_spec("gptqmodel") is None:
        pytest.skip("gptqmodel is not installed")
    saved = dict(os.environ)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    try:
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
        from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return TorchLinear, convert_gptq_v1_to_v2_format_module


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_gptqmodel_dequantisation(bits: int, gptqmodel_modules) -> None:  # noqa: ANN001
    """GPTQModel's torch kernel dequantises our packed tensors to exactly our weights (when installed)."""
    TorchLinear, convert_gptq_v1_to_v2_format_module = gptqmodel_modules

    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(bits))
    spec = QuantSpec(bits=bits, group_size=32, sym=True)
    q = quantize_rtn(weight, spec)
    layer = TorchLinear(bits=bits, group_size=32, sym=True, desc_act=False, in_features=96, out_features=64,
                        bias=False, pack_dtype=torch.int32)
    layer.load_state_dict(to_gptq_tensors(q, zero_offset=1), strict=False)
    convert_gptq_v1_to_v2_format_module(layer, bits=bits, pack_dtype=torch.int32)
    theirs = layer.dequantize_weight().T  # (out, in), computed by GPTQModel in float16
    assert torch.equal(theirs, q.dequantize(theirs.dtype))
