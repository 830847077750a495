"""The GPTQ checkpoint layout: integer codes and zeros packed into int32 words.

For a linear map W (out, in) quantised with G groups:

    qweight (ceil(in * bits / 32), out) int32   codes packed along the INPUT axis
    qzeros  (G, ceil(out * bits / 32)) int32    zeros packed along the OUTPUT axis
    scales  (G, out) float16
    g_idx   (in,) int32                         group of each input column

Packing treats each column (or row) of values as one little-endian bit stream: value k
occupies stream bits [bits * k, bits * (k + 1)) and word w holds stream bits [32 w, 32 w + 32).
For 2, 4 and 8 bits that is "32 / bits values per word, the first in the lowest bits"; for
3 bits it is the GPTQ layout of 32 values in 3 words with values 10 and 21 split across
word boundaries. The same code packs 1 bit.

Zeros: the GPTQ v1 format (`checkpoint_format: "gptq"`, what GPTQModel and vLLM read for
symmetric checkpoints) stores zero - 1; v1 cannot hold a zero of 0, so checkpoints with
asymmetric grids use v2 (`"gptq_v2"`, zeros stored as they are).
"""

from __future__ import annotations

from math import gcd

import torch

from moecompress.quant.spec import QuantizedWeight

_MASK32 = 0xFFFFFFFF


def _period(bits: int) -> tuple[int, int]:
    """(values, words) of the shortest repeating pattern: 32/bits values in 1 word, or 32 in 3 for 3 bits."""
    values = 32 // gcd(32, bits)
    return values, values * bits // 32


def packed_rows(n: int, bits: int) -> int:
    """int32 words needed for n values of `bits` bits."""
    return -(-n * bits // 32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values (n, m) in [0, 2^bits) along axis 0 -> (ceil(n * bits / 32), m) int32."""
    n, m = values.shape
    per, words = _period(bits)
    periods = -(-n // per)
    v = torch.zeros(periods * per, m, dtype=torch.int64)
    v[:n] = values.to(torch.int64)
    v = v.view(periods, per, m)
    out = torch.zeros(periods, words, m, dtype=torch.int64)
    for j in range(per):
        for w in range(words):
            shift = bits * j - 32 * w
            if shift >= 32 or shift <= -bits:
                continue
            part = v[:, j] << shift if shift >= 0 else v[:, j] >> -shift
            out[:, w] |= part & _MASK32
    out = out.view(periods * words, m)[: packed_rows(n, bits)]
    out = torch.where(out >= 2**31, out - 2**32, out)  # two's complement int32
    return out.to(torch.int32).contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_rows`: (ceil(n * bits / 32), m) int32 -> (n, m) int64 values."""
    rows, m = packed.shape
    per, words = _period(bits)
    periods = -(-rows // words)
    w_all = torch.zeros(periods * words, m, dtype=torch.int64)
    w_all[:rows] = packed.to(torch.int64) & _MASK32
    w_all = w_all.view(periods, words, m)
    maxq = 2**bits - 1
    out = torch.zeros(periods, per, m, dtype=torch.int64)
    for j in range(per):
        value = torch.zeros(periods, m, dtype=torch.int64)
        for w in range(words):
            shift = bits * j - 32 * w
            if shift >= 32 or shift <= -bits:
                continue
            value |= w_all[:, w] >> shift if shift >= 0 else w_all[:, w] << -shift
        out[:, j] = value & maxq
    return out.view(periods * per, m)[:n]


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values (m, n) along axis 1 -> (m, ceil(n * bits / 32)) int32."""
    return pack_rows(values.T, bits).T.contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_cols`."""
    return unpack_rows(packed.T, bits, n).T.contiguous()


def to_gptq_tensors(q: QuantizedWeight, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx of a quantised weight; zero_offset 1 = GPTQ v1, 0 = v2."""
    stored_zeros = q.zeros.to(torch.int64) - zero_offset
    if bool((stored_zeros < 0).any()):
        raise ValueError("a zero point of 0 cannot be stored in GPTQ v1; write the v2 format (zero_offset=0)")
    return {
        "qweight": pack_rows(q.codes.T, q.bits),  # codes (out, in) -> (in, out) packed along in
        "qzeros": pack_cols(stored_zeros, q.bits),
        "scales": q.scales.to(torch.float16).contiguous(),
        "g_idx": q.g_idx.to(torch.int32).contiguous(),
    }


def from_gptq_tensors(tensors: dict[str, torch.Tensor], bits: int, out_features: int, in_features: int,
                      sym: bool, zero_offset: int = 1) -> QuantizedWeight:
    """A `QuantizedWeight` from the four GPTQ tensors of one module (inverse of `to_gptq_tensors`)."""
    codes = unpack_rows(tensors["qweight"], bits, in_features).T.to(torch.uint8).contiguous()  # (out, in)
    zeros = (unpack_cols(tensors["qzeros"], bits, out_features) + zero_offset).to(torch.int32)  # (G, out)
    scales = tensors["scales"].to(torch.float16)
    g_idx = tensors["g_idx"].to(torch.int32)
    num_groups = scales.shape[0]
    group = -(-in_features // num_groups)
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group, sym)
