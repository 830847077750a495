"""What one linear map is quantised to (`QuantSpec`) and what quantising it produced (`QuantizedWeight`).

A weight W (out, in) quantised with a uniform grid per (group of input columns, output row):

    W_hat[o, i] = scale[g(i), o] * (q[o, i] - zero[g(i), o]),   q in {0, ..., 2^bits - 1}

with g = g_idx (i // group_size, or the act-order group of column i). Scales are stored in
float16 (the GPTQ format's dtype) and the quantiser itself uses the fp16-rounded scale, so
dequantising a written checkpoint gives exactly the weights the quantiser chose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from moecompress.errors import MoecompressError

SUPPORTED_BITS = (1, 2, 3, 4, 8)
# bits the GPTQ format (and GPTQModel) can hold; 1 bit is fake-quant / moecompress loader only
GPTQ_FORMAT_BITS = (2, 3, 4, 8)
UNQUANTIZED = 16


class QuantSpec(BaseModel):
    """Quantisation settings of one linear map (or one expert: gate, up and down alike).

    bits: 1, 2, 3, 4 or 8. group_size: input columns sharing a scale and zero (-1 = one group
    per output row, "per channel"). sym: symmetric grid (zero fixed at the grid centre).
    act_order: GPTQ visits columns by decreasing Hessian diagonal (stored as g_idx).
    group_aware: GPTQ's group-aware reordering (GAR): columns by decreasing Hessian diagonal
    inside each group, groups by their largest; g_idx stays i // group. Ignored with act_order.
    damp: GPTQ damping as a fraction of the mean Hessian diagonal (raised automatically when
    the Cholesky factorisation fails). method: "gptq" or "rtn" (round to nearest).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    group_aware: bool = True
    damp: float = 0.01
    method: Literal["gptq", "rtn"] = "gptq"

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, value: int) -> int:
        if value not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {value}")
        return value

    @field_validator("group_size")
    @classmethod
    def _check_group(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError("group_size must be -1 (per channel) or a positive number of columns")
        return value

    @field_validator("damp")
    @classmethod
    def _check_damp(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError("damp must be a fraction in (0, 1)")
        return value

    def effective_group(self, in_features: int) -> int:
        """Columns per group for a weight with `in_features` inputs (per channel = all of them)."""
        if self.group_size == -1 or self.group_size >= in_features:
            return in_features
        return self.group_size

    def storage_bits(self, out_features: int, in_features: int) -> float:
        """Bits per weight on disk in the GPTQ format: codes + fp16 scales + packed zeros + int32 g_idx."""
        groups = -(-in_features // self.effective_group(in_features))
        words_q = -(-in_features * self.bits // 32) * out_features
        words_z = groups * -(-out_features * self.bits // 32)
        total = 32 * (words_q + words_z) + 16 * groups * out_features + 32 * in_features
        return total / (out_features * in_features)


def parse_spec(**values: object) -> QuantSpec:
    """A `QuantSpec` from user values; a one-line `MoecompressError` when they are invalid."""
    from pydantic import ValidationError

    try:
        return QuantSpec(**values)  # type: ignore[arg-type]
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "quantisation settings"
        raise MoecompressError(f"{where}: {first['msg']}") from None


@dataclass
class QuantizedWeight:
    """A quantised weight (out, in): integer codes, fp16 scales, integer zeros and g_idx."""

    codes: torch.Tensor  # (out, in) uint8, values in [0, 2^bits)
    scales: torch.Tensor  # (G, out) float16
    zeros: torch.Tensor  # (G, out) int32, values in [0, 2^bits)
    g_idx: torch.Tensor  # (in,) int32, group of each input column
    bits: int
    group_size: int  # columns per group (in_features when per channel)
    sym: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat (out, in) = scale[g_idx] * (codes - zeros[g_idx]), computed in float32, cast to dtype."""
        out_features, in_features = self.codes.shape
        groups = self.scales.shape[0]
        g = self.g_idx.long()
        if groups * self.group_size == in_features and torch.equal(
                g, torch.arange(in_features, device=g.device) // self.group_size):
            # sequential groups (no act-order): broadcast each group's scale and zero over its columns
            codes = self.codes.float().view(out_features, groups, self.group_size)  # (out, G, gs)
            zeros = self.zeros.float().T[:, :, None]  # (out, G, 1)
            scales = self.scales.float().T[:, :, None]  # (out, G, 1)
            return ((codes - zeros) * scales).view(out_features, in_features).to(dtype)
        scales = self.scales.float()[g].T  # (out, in)
        zeros = self.zeros.float()[g].T  # (out, in)
        return ((self.codes.float() - zeros) * scales).to(dtype)
