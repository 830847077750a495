"""The on-disk weight formats MoE checkpoints are published in, read as plain float tensors.

Three formats, named by `config.json`'s `quantization_config.quant_method`:

* plain floats (no `quantization_config`): bf16 / fp16 / fp32, read as stored.
* `fp8` block-scaled (DeepSeek-V3/R1, Kimi-K2, GLM-4.5-FP8, Qwen3-*-FP8, MiniMax-M2): a linear's
  `weight` (out, in) is float8 (e4m3 or e5m2) with a float32 `weight_scale_inv` (or
  `weight_scale`) of shape (ceil(out / b0), ceil(in / b1)) for blocks of `weight_block_size`
  [b0, b1]; the float weight is W[r, c] = q[r, c] * s[r // b0, c // b1] (the stored scale is
  the dequantisation multiplier whatever its name). Blocks at the right and bottom edges may
  be partial.
* `mxfp4` (gpt-oss experts, OCP Microscaling FP4): a fused expert tensor is stored as
  `<name>_blocks` (E, R, K / 32, 16) uint8, two FP4 e2m1 codes per byte (low nibble first),
  and `<name>_scales` (E, R, K / 32) uint8 e8m0 exponents: value = e2m1(code) * 2^(scale - 127)
  for the 32 values of a block. The stored matrix is (R, K) = (out, in); the model's
  parameter is its transpose (E, in, out), as transformers' gpt-oss loader lays it out.

`StoredTensors` presents a checkpoint's shards as the float tensors these describe (the
names transformers' plain loader expects: scales and blocks folded into their weight), one
tensor at a time, and remembers which stored tensors make up each one (`parts`), so a copy
can carry them byte for byte. The quantisers (`quantize_fp8_blocks`, `quantize_mxfp4`) write
changed matrices back in the input's format.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moecompress.errors import MoecompressError
from moecompress.io.safetensors_stream import TensorEntry, TensorFiles
from moecompress.models.weight_format import StoredFormat, dequantized_dtype, stored_format

FP8_SCALE_SUFFIXES = ("_scale_inv", "_scale")  # appended to the weight's name
MXFP4_BLOCK = 32  # values per MXFP4 block (one shared exponent)
DEQUANT_BAND_ROWS = 2048  # rows of an FP8 matrix dequantised at a time
# the 16 FP4 e2m1 codes: sign bit 3, two exponent bits, one mantissa bit
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127


# ---------------------------------------------------------------- FP8 blocks

def _block_grid(scale: torch.Tensor, block: tuple[int, int] | None, rows: int, cols: int) -> torch.Tensor:
    """The per-element multiplier (..., rows, cols) from per-block scales (..., ceil(rows/b0), ceil(cols/b1))."""
    scale = scale.float()
    if block is None or scale.dim() == 0 or scale.numel() == 1:
        return scale.reshape(*scale.shape[:-2], 1, 1) if scale.dim() >= 2 else scale
    b0, b1 = block
    return scale.repeat_interleave(b0, dim=-2)[..., :rows, :].repeat_interleave(b1, dim=-1)[..., :cols]


def dequantize_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                          dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W = q * s per block: weight (..., out, in) float8, scale (..., ceil(out/b0), ceil(in/b1)) -> dtype.

    Works through the rows a band of blocks at a time, so a large matrix (DeepSeek-V3's dense
    MLP is 18432 x 7168) needs float32 working memory for one band only, not for the matrix.
    """
    rows, cols = weight.shape[-2:]
    expected = (-(-rows // block[0]), -(-cols // block[1])) if block else None
    if expected is not None and tuple(scale.shape[-2:]) != expected:
        raise MoecompressError(f"FP8 scales of shape {list(scale.shape)} do not match a weight of shape "
                               f"{list(weight.shape)} in {block[0]}x{block[1]} blocks; the checkpoint is corrupt")
    if block is None:
        return (weight.to(torch.float32) * _block_grid(scale, None, rows, cols)).to(dtype)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)  # (..., out, in)
    band = block[0] * max(1, DEQUANT_BAND_ROWS // block[0])  # rows per step, whole blocks
    for start in range(0, rows, band):
        stop = min(start + band, rows)
        part = weight[..., start:stop, :].to(torch.float32)  # (..., band, in)
        scales = scale[..., start // block[0] : -(-stop // block[0]), :]
        part.mul_(_block_grid(scales, block, stop - start, cols))
        out[..., start:stop, :] = part
    return out


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int] | None, fp8_dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) with q = W / s rounded to float8 and s = amax(|block|) / max(float8) per block (1 for zero blocks)."""
    w = weight.detach().float()  # (..., out, in)
    rows, cols = w.shape[-2:]
    limit = torch.finfo(fp8_dtype).max
    b0, b1 = block if block else (rows, cols)
    grid_rows, grid_cols = -(-rows // b0), -(-cols // b1)
    padded = torch.nn.functional.pad(w.abs(), (0, grid_cols * b1 - cols, 0, grid_rows * b0 - rows))
    amax = padded.unflatten(-1, (grid_cols, b1)).unflatten(-3, (grid_rows, b0)).amax(dim=(-3, -1))  # (..., R, C)
    scale = torch.where(amax > 0, amax / limit, torch.ones_like(amax))
    q = (w / _block_grid(scale, (b0, b1), rows, cols)).clamp(-limit, limit).to(fp8_dtype)
    return q, scale if block else scale.reshape(())


# ---------------------------------------------------------------- MXFP4

def _e2m1_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The stored matrices (..., R, G * 32) from blocks (..., R, G, 16) uint8 and scales (..., R, G) uint8."""
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise MoecompressError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match; "
                               "the checkpoint is corrupt")
    table = _e2m1_table(blocks.device)
    codes = blocks.to(torch.uint8)
    values = torch.stack([table[(codes & 0x0F).long()], table[(codes >> 4).long()]], dim=-1)  # (..., R, G, 16, 2)
    values = values.flatten(-2)  # (..., R, G, 32)
    exponent = scales.to(torch.int32) - E8M0_BIAS  # (..., R, G)
    values = torch.ldexp(values, exponent[..., None].float())
    return values.flatten(-2).to(dtype)  # (..., R, G * 32)


def quantize_mxfp4(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of stored matrices (..., R, K), K a multiple of 32: the nearest e2m1 code per value.

    Each block's exponent is the smallest e with amax / 2^e <= 6 (the largest e2m1 value).
    """
    rows, width = matrix.shape[-2:]
    if width % MXFP4_BLOCK:
        raise MoecompressError(f"MXFP4 blocks hold {MXFP4_BLOCK} values, and {width} is not a multiple of {MXFP4_BLOCK}")
    x = matrix.detach().float().unflatten(-1, (width // MXFP4_BLOCK, MXFP4_BLOCK))  # (..., R, G, 32)
    amax = x.abs().amax(dim=-1)  # (..., R, G)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax))
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = torch.ldexp(x, -exponent[..., None])  # (..., R, G, 32), |scaled| <= 6
    table = _e2m1_table(matrix.device)[:8]  # the non-negative codes 0..7
    magnitude = (scaled.abs()[..., None] - table).abs().argmin(dim=-1)  # (..., R, G, 32) nearest code
    codes = (magnitude | ((scaled < 0) & (magnitude > 0)).to(torch.long) << 3).to(torch.uint8)
    pairs = codes.unflatten(-1, (MXFP4_BLOCK // 2, 2))  # (..., R, G, 16, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks.contiguous(), (exponent.to(torch.int32) + E8M0_BIAS).to(torch.uint8)


# ---------------------------------------------------------------- the logical view

@dataclass(frozen=True)
class _Logical:
    """How one float tensor of the view is made from stored tensors."""

    kind: str  # "stored", "fp8" or "mxfp4"
    parts: tuple[str, ...]  # stored names; the first is the weight (fp8) or the blocks (mxfp4)


class StoredTensors:
    """A checkpoint's tensors as plain floats: FP8 weights and MXFP4 blocks dequantised on request.

    Quacks like `TensorFiles` for the reader and the expert copy: `entries` (logical names,
    with the float dtype and shape they dequantise to), `names()`, `tensor(name)`, and
    `parts(name)`, the stored tensors that make up a logical one (each is the logical name
    plus a suffix), which `files` serves as stored bytes.
    """

    def __init__(self, files: TensorFiles, fmt: StoredFormat, dtype: torch.dtype = torch.bfloat16) -> None:
        self.files = files
        self.format = fmt
        self.dtype = dtype  # what quantised tensors dequantise to
        self.entries: dict[str, TensorEntry] = {}
        self._logical: dict[str, _Logical] = {}
        stored = files.entries
        quantized: dict[str, tuple[str, TensorEntry, _Logical]] = {}  # first stored part -> logical tensor
        consumed: set[str] = set()
        for name, entry in stored.items():
            if fmt.method == "fp8" and entry.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                scale = next((name + s for s in FP8_SCALE_SUFFIXES if name + s in stored), None)
                if scale is None:
                    raise MoecompressError(f"FP8 tensor {name!r} has no {name}_scale_inv beside it; the checkpoint "
                                           "is incomplete")
                quantized[name] = (name, replace(entry, dtype=dtype), _Logical("fp8", (name, scale)))
                consumed.add(scale)
            elif fmt.method == "mxfp4" and name.endswith("_blocks") and name[:-7] + "_scales" in stored:
                base = name[:-7]
                *lead, rows, groups, half = entry.shape
                shape = (*lead, groups * half * 2, rows)  # the parameter's layout: (E, in, out)
                quantized[name] = (base, replace(entry, name=base, dtype=dtype, shape=tuple(shape)),
                                   _Logical("mxfp4", (name, base + "_scales")))
                consumed.add(base + "_scales")
        for name, entry in stored.items():  # in file order
            if name in quantized:
                self._add(*quantized[name])
            elif name not in consumed:
                self._add(name, entry, _Logical("stored", (name,)))

    def _add(self, name: str, entry: TensorEntry, logical: _Logical) -> None:
        self.entries[name] = entry
        self._logical[name] = logical

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        """Every logical tensor name, in file order."""
        return list(self.entries)

    @property
    def store(self) -> TensorFiles:
        """The files that hold the stored parts."""
        return self.files

    @property
    def copies_on_read(self) -> bool:
        """Dequantised tensors are new memory (a layer's sources are held beside what they load into)."""
        return True

    def parts(self, name: str) -> tuple[str, ...]:
        """The stored tensors `name` is made of (itself when stored as a float)."""
        return self._logical[name].parts

    def is_quantized(self, name: str) -> bool:
        """Whether `name` is stored in a quantised format (FP8 blocks or MXFP4)."""
        return self._logical[name].kind != "stored"

    def tensor(self, name: str) -> torch.Tensor:
        """The float tensor: as stored, or dequantised to `dtype` (a new tensor)."""
        logical = self._logical.get(name)
        if logical is None:
            raise MoecompressError(f"tensor {name!r} is missing from the checkpoint's safetensors files")
        if logical.kind == "stored":
            return self.files.tensor(name)
        first, second = (self.files.tensor(part) for part in logical.parts)
        if logical.kind == "fp8":
            return dequantize_fp8_blocks(first, second, self.format.block, self.dtype)
        return dequantize_mxfp4(first, second, self.dtype).transpose(-1, -2).contiguous()

    def raw(self, name: str) -> memoryview:
        """Stored bytes of a tensor stored as a float (quantised ones are copied part by part)."""
        if self.is_quantized(name):
            raise MoecompressError(f"internal error: {name!r} is stored quantised; copy its parts")
        return self.files.raw(name)

    def requantize(self, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stored tensors (part name -> tensor) holding `value` in the format `name` is stored in."""
        logical = self._logical[name]
        if logical.kind == "fp8":
            q, scale = quantize_fp8_blocks(value, self.format.block, self.format.fp8_dtype)
            return {logical.parts[0]: q, logical.parts[1]: scale}
        if logical.kind == "mxfp4":
            blocks, scales = quantize_mxfp4(value.transpose(-1, -2))
            return {logical.parts[0]: blocks, logical.parts[1]: scales}
        return {name: value}


def open_tensors(files: Iterable[Any], config: Any) -> TensorFiles | StoredTensors:
    """The float tensors of a checkpoint's shards: `TensorFiles` for float checkpoints, else a dequantising view."""
    fmt = stored_format(config)
    stored = TensorFiles(files)
    if not fmt.quantized:
        return stored
    return StoredTensors(stored, fmt, dequantized_dtype(config))


def stored_bytes(files: TensorFiles | StoredTensors, name: str) -> int:
    """Bytes a logical tensor occupies on disk (all its parts)."""
    if isinstance(files, StoredTensors):
        return sum(files.files.entries[part].nbytes for part in files.parts(name))
    return files.entries[name].nbytes


_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def _pattern(name: str) -> str:
    """A tensor name with its layer and expert indices replaced (`layers.3.mlp.experts.7.w` -> `layers.*.mlp.experts.*.w`)."""
    return _INDEX.sub("*", name)


def linear_weight_names(model: torch.nn.Module) -> set[str]:
    """The weights of a model's `nn.Linear` modules: what transformers' FP8 loader expects in FP8."""
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _not_converted(module: str, patterns: tuple[str, ...]) -> bool:
    """Whether `modules_to_not_convert` names this module, matched as transformers' quantizers match it."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return bool(patterns) and not should_convert_module(module, list(patterns))


def restore_stored_format(folder: Path, source: StoredTensors, linear_weights: Iterable[str] = ()) -> dict[str, int]:
    """Rewrite the float shards a model writer put in `folder` in the format `source` is stored in.

    Each output tensor that the input stores quantised (by name, or by name with any layer and
    expert index: renumbered experts, a condensed layer's new dense MLP) is written in the
    input's format: copied byte for byte
    from the input when its values are exactly the input's dequantised tensor, else
    re-quantised with the input's block size (a matrix whose shape or values changed).
    For FP8, so is every other weight in `linear_weights` (a new linear, such as a condensed
    layer's dense MLP, that transformers will load as FP8) unless `modules_to_not_convert`
    names its module. `config.json` gets the input's `quantization_config`. Returns counts of copied, requantised
    and float tensors.
    """
    import json

    from moecompress.io.safetensors_stream import ShardWriter

    templates: dict[str, str] = {}  # name pattern -> a quantised input tensor of that pattern
    for name in source.names():
        if source.is_quantized(name):
            templates.setdefault(_pattern(name), name)
    fp8_template = next(iter(templates.values()), None) if source.format.method == "fp8" else None
    new_linears = {name for name in linear_weights
                   if not _not_converted(name.rpartition(".")[0], source.format.not_converted)}
    shards = sorted(folder.glob("*.safetensors"))
    written = TensorFiles(shards)
    counts = {"copied": 0, "requantized": 0, "float": 0}
    staging = folder / ".stored-format"
    staging.mkdir()
    writer = ShardWriter(staging, max_shard_bytes="5GB")
    for name in written.names():
        value = written.tensor(name)
        if name in source and source.is_quantized(name):
            original = source.tensor(name)
            if original.shape == value.shape and torch.equal(original.to(value.dtype), value):
                for part in source.parts(name):
                    entry = source.store.entries[part]
                    writer.add_raw(part, entry.dtype, entry.shape, source.store.raw(part))
                counts["copied"] += 1
                continue
        template = None
        if value.dim() >= 2 and _pattern(name) in templates:
            template = name if name in source and source.is_quantized(name) else templates[_pattern(name)]
        elif value.dim() == 2 and name in new_linears and fp8_template is not None:
            template = fp8_template  # any FP8 tensor: the block size and scale name are global
        if template is not None:
            try:
                stored = source.requantize(template, value)
            except MoecompressError as err:
                raise MoecompressError(f"{name} cannot be stored in the input's format ({err}); keep a width that "
                                       "fits the format's blocks (a multiple of 32 for MXFP4)") from None
            for part, tensor in stored.items():
                writer.add(name + part[len(template):], tensor)
            counts["requantized"] += 1
            continue
        writer.add(name, value)
        counts["float"] += 1
    del written
    files = writer.finish()
    for shard in shards:
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    for path in [*files, *staging.glob("*.json")]:
        path.rename(folder / path.name)
    staging.rmdir()
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = dict(source.format.config)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return counts
