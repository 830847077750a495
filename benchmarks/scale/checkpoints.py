"""Random-weight bf16 checkpoints with a published model's layer shapes and on-disk key names.

`on_disk_shapes` builds the model on the meta device (no memory) and maps its in-memory
parameters (fused experts such as `gate_up_proj [E, 2I, H]`) to the per-expert names that
`save_pretrained` writes (`...mlp.experts.3.gate_proj.weight`) with transformers' own
`revert_weight_conversion`. `build_checkpoint` then generates each on-disk tensor on its own
(rows in chunks, from a generator seeded by the tensor's name, so a shallower checkpoint holds
exactly the leading layers of a deeper one) and streams it into shards with moecompress's
`ShardWriter`: at most one shard of tensors is ever in memory. `cached_checkpoint` keeps built
checkpoints under $MOECOMPRESS_SCALE_DIR (default ~/.cache/moecompress/scale).
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


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A bf16 tensor for `name`: norms ones, correction biases zeros, everything else N(0, 0.02).

    Generated row chunk by row chunk so that no float32 copy of a large tensor exists.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("e_score_correction_bias") or name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(shape[0], -1) if len(shape) > 1 else out.view(1, -1)
    rows = max(1, CHUNK_ELEMENTS // max(1, flat.shape[1]))
    generator = torch.Generator().manual_seed(_seed(seed, name))
    for start in range(0, flat.shape[0], rows):
        block = flat[start:start + rows]
        block.copy_(torch.randn(block.shape, generator=generator, dtype=torch.float32).mul_(INIT_STD))
    return out


def build_checkpoint(folder: str | Path, spec: ModelSpec | str, layers: int, seed: int = 0,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a random bf16 checkpoint of `spec` with `layers` decoder layers into `folder`.

    Writes config.json, a 300-token tokenizer (ids < 300 are valid for any vocabulary) and the
    safetensors shards with their index; returns a record (spec, layers, config, tensors,
    bytes, seconds) that is also saved as `scale.json`.
    """
    from moecompress.io.safetensors_stream import ShardWriter
    from tests.tiny_tokenizer import save_tokenizer

    spec = SPECS[spec] if isinstance(spec, str) else spec
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = spec.config(layers, overrides)
    shapes = on_disk_shapes(config)
    writer = ShardWriter(folder, max_shard_bytes=MAX_SHARD_BYTES)
    for name in sorted(shapes, key=_order):
        writer.add(name, random_tensor(name, shapes[name], seed))
    files = writer.finish()
    config.save_pretrained(folder)
    save_tokenizer(folder, vocab_size=300)
    record = {
        "spec": spec.name, "title": spec.title, "layers": layers, "full_layers": spec.full_layers, "seed": seed,
        "overrides": overrides or {}, "config": spec.config_dict(layers, overrides), "tensors": len(shapes),
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
    partial = root / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        record = build_checkpoint(partial, spec, layers, seed, overrides)
        shutil.rmtree(target, ignore_errors=True)  # a stale folder without its marker
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target, record


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of a checkpoint's safetensors shards."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
