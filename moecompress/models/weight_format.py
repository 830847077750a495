"""What a checkpoint's config says about how its weights are stored on disk.

`config.json`'s `quantization_config.quant_method` names the format: none (plain bf16 / fp16 /
fp32), `fp8` (block-scaled FP8, `weight_block_size` [b0, b1], `fmt` e4m3 or e5m2) or `mxfp4`
(gpt-oss experts). Reading and writing those formats is `moecompress.io.stored_formats`; this
module only parses the declaration, so every command can refuse a format it cannot read
before any work, in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from moecompress.errors import MoecompressError

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
READ_FORMATS = "bf16/fp16/fp32, FP8 block-scaled (quant_method fp8) and MXFP4 (quant_method mxfp4)"


@dataclass(frozen=True)
class StoredFormat:
    """How a checkpoint stores its weights (from `config.json`'s `quantization_config`)."""

    method: str  # "float", "fp8" or "mxfp4"
    block: tuple[int, int] | None = None  # FP8 weight_block_size (rows, columns); None: one scale per tensor
    fp8_dtype: torch.dtype | None = None
    not_converted: tuple[str, ...] = ()  # the config's modules_to_not_convert
    config: dict[str, Any] = field(default_factory=dict)  # the quantization_config as published

    @property
    def quantized(self) -> bool:
        return self.method != "float"

    def describe(self) -> str:
        """One phrase naming the format, e.g. "FP8 e4m3, 128x128 blocks"."""
        if self.method == "fp8":
            name = "e4m3" if self.fp8_dtype == torch.float8_e4m3fn else "e5m2"
            blocks = f"{self.block[0]}x{self.block[1]} blocks" if self.block else "one scale per tensor"
            return f"FP8 {name}, {blocks}"
        if self.method == "mxfp4":
            return "MXFP4 experts (e2m1 codes, one e8m0 exponent per 32 values)"
        return "plain floats"


FLOAT_FORMAT = StoredFormat("float")


def _raw_quantization_config(config: Any) -> dict[str, Any] | None:
    found = getattr(config, "quantization_config", None)
    if found is None:
        return None
    if not isinstance(found, dict):
        to_dict = getattr(found, "to_dict", None)
        found = to_dict() if callable(to_dict) else dict(vars(found))
    return found


def stored_format(config: Any) -> StoredFormat:
    """The stored format a config declares; an unknown `quant_method` is a one-line error."""
    raw = _raw_quantization_config(config)
    if not raw:
        return FLOAT_FORMAT
    method = str(raw.get("quant_method", "")).lower()
    not_converted = tuple(raw.get("modules_to_not_convert") or ())
    if method == "fp8":
        fmt = str(raw.get("fmt", "e4m3")).lower()
        if fmt not in FP8_DTYPES:
            raise MoecompressError(f"quantization_config.fmt {fmt!r} is not an FP8 format moecompress reads "
                                   f"(e4m3, e5m2)")
        block = raw.get("weight_block_size")
        if block is not None and (len(block) != 2 or min(int(b) for b in block) < 1):
            raise MoecompressError(f"quantization_config.weight_block_size {block!r} is not two positive sizes")
        return StoredFormat("fp8", tuple(int(b) for b in block) if block else None, FP8_DTYPES[fmt],
                            not_converted, dict(raw))
    if method == "mxfp4":
        return StoredFormat("mxfp4", not_converted=not_converted, config=dict(raw))
    raise MoecompressError(f"the checkpoint is quantised with quant_method {method or '(none)'!r}, which moecompress "
                           f"cannot read; it reads {READ_FORMATS} checkpoints")


def width_multiple(fmt: StoredFormat) -> int:
    """The multiple a changed expert width must keep to be stored in `fmt` with whole blocks.

    FP8 blocks span b0 output rows (gate/up) and b1 input columns (down); MXFP4 blocks span 32
    inputs (down). transformers reads block scales back by dividing a matrix's shape by the
    scale grid, so a matrix with a partial block would load wrongly.
    """
    if fmt.method == "fp8" and fmt.block:
        return math.lcm(*fmt.block)
    if fmt.method == "mxfp4":
        return 32
    return 1


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def dequantized_dtype(config: Any) -> torch.dtype:
    """The float dtype FP8 / MXFP4 weights dequantise to: the config's declared float dtype, bf16 by default."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared.replace("torch.", ""), None)
    return declared if declared in FLOAT_DTYPES else torch.bfloat16
