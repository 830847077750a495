"""Budgets of `export gguf --bits B` / `--size S`, and the size each GGML type costs a tensor.

A GGML type stores blocks of `block` values in `size` bytes (block scales included), so a
tensor of n values (n a multiple of `block`) costs, and averages over the counted matrices,

    bytes_t(n) = n / block_t * size_t          bpw_t = 8 size_t / block_t
    --bits B:  sum_k n_k bpw_{t_k} <= B sum_k n_k          over every matrix not kept float32
    --size S:  header + sum_k pad_32(bytes_{t_k}(n_k)) <= S   (the whole file)

(Q4_0 4.5, Q4_1 5.0, Q5_0 5.5, Q5_1 6.0, Q8_0 8.5, F16 16, F32 32 bits per weight.) The
matrices kept float32 (norms, routers) count in neither the average nor the choice; the
header (metadata, tokenizer, the tensor table) and the fixed tensors count in `--size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from moecompress.errors import MoecompressError
from moecompress.quant.budget import SizeBudget, parse_size

T = GGMLQuantizationType

# the types `gguf` both quantises and dequantises in Python, narrowest first
WRITABLE: tuple[GGMLQuantizationType, ...] = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.F16, T.F32)
# the default candidates: the block types. F16 / F32 are left out: the error measure sees only the weights, while
# llama.cpp's CPU kernels also round the activations to f16 before an f16 product, and in the benchmark the LP's
# f16 picks (zero measured error) cost more than uniform Q8_0 at the same size (docs/gguf.md)
CANDIDATES: tuple[GGMLQuantizationType, ...] = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
ALIGNMENT = 32  # GGUF's default data alignment (every tensor's data is padded to it)


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    """Bits one value costs in `qtype`, its block scales included (Q4_0: 18 bytes per 32 values = 4.5)."""
    block, size = GGML_QUANT_SIZES[qtype]
    return 8.0 * size / block


def tensor_bytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of numpy shape `shape` stored as `qtype` (rows a whole number of blocks)."""
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def padded(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """`nbytes` rounded up to the file's data alignment."""
    return GGUFWriter.ggml_pad(nbytes, alignment)


def fits(shape: Sequence[int], qtype: GGMLQuantizationType) -> bool:
    """Whether the rows of a tensor of `shape` are a whole number of `qtype`'s blocks."""
    return len(shape) >= 2 and shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0


@dataclass(frozen=True)
class GGUFBudget:
    """`--bits` (average bits per weight over the counted matrices) or `--size` (the file's bytes)."""

    bits: float | None = None
    size: SizeBudget | None = None

    def describe(self) -> str:
        """`4.5 bits per weight` or the size as given."""
        if self.bits is not None:
            return f"{self.bits:g} bits per weight"
        return self.size.describe()  # type: ignore[union-attr]


def parse_budget(bits: float | None, size: str | None) -> GGUFBudget | None:
    """The budget from `--bits` / `--size` (None when neither is given); one-line errors otherwise."""
    if bits is not None and size is not None:
        raise MoecompressError("give --bits or --size, not both")
    if bits is not None:
        top = bits_per_weight(T.F32)
        if not 0 < bits <= top:
            raise MoecompressError(f"--bits {bits:g} is outside (0, {top:g}]: {top:g} bits per weight is f32, the "
                                   "widest type (use --type f32 for an unquantised file)")
        return GGUFBudget(bits=float(bits))
    if size is not None:
        return GGUFBudget(size=parse_size(size))
    return None


def type_name(qtype: GGMLQuantizationType) -> str:
    """`Q4_0`, `F16`, ... (the names llama.cpp prints)."""
    return qtype.name
