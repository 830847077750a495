"""Random-weight checkpoints with a published model's layer shapes, on-disk key names and dtypes.

`on_disk_shapes` builds the model on the meta device (no memory) and maps its in-memory
parameters (fused experts such as `gate_up_proj [E, 2I, H]`) to the per-expert names that
`save_pretrained` writes (`...mlp.experts.3.gate_proj.weight`) with transformers' own
`revert_weight_conversion`. `build_checkpoint` then generates each on-disk tensor on its own
(rows in chunks, from a generator seeded by the tensor's name, so a shallower checkpoint holds
exactly the leading layers of a deeper one) and streams it into shards with moecompress's
`ShardWriter`: at most one shard of tensors is ever in memory. `cached_checkpoint` keeps built
checkpoints under $MOECOMPRESS_SCALE_DIR (default ~/.cache/moecompress/scale).

Weights are bf16 unless the config declares block-scaled FP8 (`quantization_config.quant_method`
"fp8", as DeepSeek-V3 is published): then every 2-D weight inside the decoder layers except the
router (`mlp.gate.weight`) is written as float8 e4m3 codes with a float32 `<name>_scale_inv`
of shape [ceil(out / b0), ceil(in / b1)] (W = q * s per block), and `e_score_correction_bias`
as float32; embeddings, head, norms and router stay bf16. The codes are N(0, 16) (far inside
e4m3's +-448, never a NaN code) and each block's scale is 0.02 / 16 x U(0.5, 1.5), so the
dequantised weights have the bf16 variant's std, about 0.02.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from benchmarks.scale.specs import SPECS, ModelSpec

ENV_DIR = "MOECOMPRESS_SCALE_DIR"
MARKER = "scale.json"  # written last: a folder without it is not a finished checkpoint
MAX_SHARD_BYTES = "1GB"
INIT_STD = 0.02
CHUNK_ELEMENTS = 1 << 24  # rows are generated in float32 chunks of about this many values
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn}  # quantization_config.fmt -> the codes' dtype
FP8_CODE_STD = 16.0  # std of the random FP8 codes: 28 sigma below e4m3's largest value, 448
FP8_SCALE_SPREAD = (0.5, 1.5)  # each block's scale is INIT_STD / FP8_CODE_STD times a uniform draw in this range
SCALE_SUFFIX = "_scale_inv"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def on_disk_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """On-disk tensor name -> shape of the checkpoint `save_pretrained` would write for `config`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    reverted = revert_weight_conversion(model, model.state_dict())
    return {name: tuple(tensor.shape) for name, tensor in reverted.items()}


def _order(name: str) -> tuple[int, int, str]:
    """Embeddings first, then decoder layers in order, then the final norm and the head."""
    found = _LAYER.search(name)
    if found:
        return (1, int(found.group(1)), name)
    return (0 if "embed_tokens" in name else 2, 0, name)


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF


def _fill_normal(out: torch.Tensor, generator: torch.Generator, std: float) -> torch.Tensor:
    """Fill `out` (any dtype) with N(0, std) row chunk by row chunk, so that no float32 copy of it exists."""
    flat = out.view(out.shape[0], -1) if out.dim() > 1 else out.view(1, -1)
    rows = max(1, CHUNK_ELEMENTS // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], rows):
        block = flat[start:start + rows]
        block.copy_(torch.randn(block.shape, generator=generator, dtype=torch.float32).mul_(std))
    return out


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A bf16 tensor for `name`: norms ones, correction biases zeros, everything else N(0, 0.02)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("e_score_correction_bias") or name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(_seed(seed, name))
    return _fill_normal(torch.empty(shape, dtype=torch.bfloat16), generator, INIT_STD)


def fp8_format(config: dict[str, Any]) -> tuple[torch.dtype, tuple[int, int]] | None:
    """(codes' dtype, block) when the config dict declares block-scaled FP8 weights; None for bf16 weights."""
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != "fp8":
        return None
    fmt = quantization.get("fmt", "e4m3")
    if fmt not in FP8_DTYPES or len(quantization.get("weight_block_size") or ()) != 2:
        raise ValueError(f"the scale builder writes FP8 e4m3 in [rows, columns] blocks, not {quantization}")
    rows, cols = quantization["weight_block_size"]
    return FP8_DTYPES[fmt], (int(rows), int(cols))


def is_fp8_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the published FP8 checkpoint stores `name` in FP8: a 2-D weight inside a decoder layer but the router.

    In DeepSeek-V3 those are exactly the decoder layers' `nn.Linear` weights (attention projections,
    dense MLP, routed and shared experts); embeddings, head, norms and the router stay bf16.
    """
    return (_LAYER.search(name) is not None and len(shape) == 2 and name.endswith(".weight")
            and not name.endswith(".mlp.gate.weight"))


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of a weight's block scales: [ceil(out / b0), ceil(in / b1)] (edge blocks may be partial)."""
    rows, cols = shape
    return -(-rows // block[0]), -(-cols // block[1])


def random_fp8(name: str, shape: tuple[int, ...], block: tuple[int, int], seed: int,
               dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes N(0, 16) of `shape` and float32 block scales 0.02 / 16 x U(0.5, 1.5) of [ceil(out/b0), ceil(in/b1)].

    The codes are converted from float32 row chunk by row chunk (no NaN code can come out of a
    finite value this far inside the range); each tensor has its own seeded generator.
    """
    grid = scale_grid(shape, block)
    scales = torch.Generator().manual_seed(_seed(seed, name + SCALE_SUFFIX))
    low, high = FP8_SCALE_SPREAD
    scale = torch.rand(grid, generator=scales, dtype=torch.float32).mul_(high - low).add_(low)
    scale.mul_(INIT_STD / FP8_CODE_STD)
    codes = torch.Generator().manual_seed(_seed(seed, name))
    return _fill_normal(torch.empty(shape, dtype=dtype), codes, FP8_CODE_STD), scale


def stored_layout(name: str, shape: tuple[int, ...], fp8: tuple[torch.dtype, tuple[int, int]] | None
                  ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The on-disk tensors (name -> dtype, shape) one model tensor is stored as: itself in bf16, or FP8 codes + scales.

    An FP8 checkpoint also keeps the router's `e_score_correction_bias` in float32, as DeepSeek-V3 is published.
    """
    if fp8 is not None and is_fp8_weight(name, shape):
        dtype, block = fp8
        return {name: (dtype, shape), name + SCALE_SUFFIX: (torch.float32, scale_grid(shape, block))}
    if fp8 is not None and name.endswith("e_score_correction_bias"):
        return {name: (torch.float32, shape)}
    return {name: (torch.bfloat16, shape)}


def stored_tensors(name: str, shape: tuple[int, ...], seed: int,
                   fp8: tuple[torch.dtype, tuple[int, int]] | None) -> dict[str, torch.Tensor]:
    """The on-disk tensors for one model tensor, as `stored_layout` lays them out, with random values."""
    layout = stored_layout(name, shape, fp8)
    if fp8 is not None and len(layout) == 2:
        codes, scale = random_fp8(name, shape, fp8[1], seed, fp8[0])
        return {name: codes, name + SCALE_SUFFIX: scale}
    return {name: random_tensor(name, shape, seed).to(layout[name][0])}


def expected_bytes(spec: ModelSpec | str, layers: int, overrides: dict[str, Any] | None = None) -> int:
    """Bytes of tensor data a build of `spec` at `layers` layers writes (its shards less their small headers).

    Computed on the meta device, without building anything.
    """
    spec = SPECS[spec] if isinstance(spec, str) else spec
    fp8 = fp8_format(spec.config_dict(layers, overrides))
    total = 0
    for name, shape in on_disk_shapes(spec.config(layers, overrides)).items():
        for dtype, stored in stored_layout(name, shape, fp8).values():
            total += _numel(stored) * dtype.itemsize
    return total


def describe_weights(config: dict[str, Any]) -> str:
    """How a config's checkpoint stores its weights, e.g. "FP8 e4m3 in 128x128 blocks" or "bf16"."""
    fp8 = fp8_format(config)
    if fp8 is None:
        return "bf16"
    return f"FP8 {config['quantization_config'].get('fmt', 'e4m3')} in {fp8[1][0]}x{fp8[1][1]} blocks"


def build_checkpoint(folder: str | Path, spec: ModelSpec | str, layers: int, seed: int = 0,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a random checkpoint of `spec` with `layers` decoder layers into `folder` (bf16, or FP8 blocks).

    Writes config.json, a 300-token tokenizer (ids < 300 are valid for any vocabulary) and the
    safetensors shards with their index; returns a record (spec, layers, config, weights,
    tensors stored, parameters, bytes, seconds) that is also saved as `scale.json`.
    """
    from moecompress.io.safetensors_stream import ShardWriter
    from tests.tiny_tokenizer import save_tokenizer

    spec = SPECS[spec] if isinstance(spec, str) else spec
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = spec.config(layers, overrides)
    values = spec.config_dict(layers, overrides)
    fp8 = fp8_format(values)
    shapes = on_disk_shapes(config)
    writer = ShardWriter(folder, max_shard_bytes=MAX_SHARD_BYTES)
    stored = 0
    for name in sorted(shapes, key=_order):
        for part, tensor in stored_tensors(name, shapes[name], seed, fp8).items():
            writer.add(part, tensor)
            stored += 1
    files = writer.finish()
    config.save_pretrained(folder)
    save_tokenizer(folder, vocab_size=300)
    record = {
        "spec": spec.name, "title": spec.title, "layers": layers, "full_layers": spec.full_layers, "seed": seed,
        "overrides": overrides or {}, "config": values, "weights": describe_weights(values), "tensors": stored,
        "parameters": sum(_numel(shape) for shape in shapes.values()),
        "bytes": sum(path.stat().st_size for path in files), "shards": len(files),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (folder / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def scale_root() -> Path:
    """Where built checkpoints are cached ($MOECOMPRESS_SCALE_DIR or ~/.cache/moecompress/scale)."""
    from benchmarks.fixtures.paths import cache_root

    return cache_root(ENV_DIR, "scale")


def cache_key(spec: ModelSpec | str, layers: int, seed: int = 0, overrides: dict[str, Any] | None = None) -> str:
    """Folder name of a cached checkpoint: spec, depth, seed, and a digest of any overrides."""
    name = spec if isinstance(spec, str) else spec.name
    key = f"{name}-L{layers}-s{seed}"
    if overrides:
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
        key += f"-{digest}"
    return key


def cached_checkpoint(spec: ModelSpec | str, layers: int, seed: int = 0, overrides: dict[str, Any] | None = None,
                      root: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The cached checkpoint folder and its record, built first when absent.

    Built into a temporary sibling and renamed into place, so an interrupted build never
    looks finished.
    """
    root = root or scale_root()
    target = root / cache_key(spec, layers, seed, overrides)
    if (target / MARKER).is_file():
        return target, json.loads((target / MARKER).read_text())
    root.mkdir(parents=True, exist_ok=True)
    check_free_space(root, expected_bytes(spec, layers, overrides), f"checkpoint {target.name}")
    partial = root / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        record = build_checkpoint(partial, spec, layers, seed, overrides)
        shutil.rmtree(target, ignore_errors=True)  # a stale folder without its marker
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target, record


def check_free_space(root: Path, needed: int, what: str, margin: float = 1.02) -> None:
    """Refuse, before minutes of writing, a build that cannot fit on the disk under `root`."""
    free = shutil.disk_usage(root).free
    if needed * margin > free:
        raise SystemExit(f"building {what} needs {needed / 1024 ** 3:.1f} GiB but {root} has "
                         f"{free / 1024 ** 3:.1f} GiB free; free some space or set ${ENV_DIR} to a larger disk")


def ensure_room(spec: ModelSpec | str, depths: list[int], overrides: dict[str, Any] | None = None,
                root: Path | None = None) -> None:
    """Refuse a run whose checkpoints not yet cached (of `depths`, seed 0) cannot all fit on the cache's disk."""
    root = root or scale_root()
    missing = [depth for depth in depths if not (root / cache_key(spec, depth, 0, overrides) / MARKER).is_file()]
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        name = spec if isinstance(spec, str) else spec.name
        check_free_space(root, sum(expected_bytes(spec, depth, overrides) for depth in missing),
                         f"the {name} checkpoints at {', '.join(map(str, missing))} layers")


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of a checkpoint's safetensors shards."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
