"""Write a Hugging Face checkpoint folder: sharded safetensors, config, tokenizer, manifest, README."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

import torch

from moecompress.io.manifest import write_manifest

DEFAULT_SHARD_SIZE = "2GB"


def write_checkpoint(model: torch.nn.Module, tokenizer: Any | None, folder: str | Path, manifest: dict[str, Any],
                     readme: str, max_shard_size: str = DEFAULT_SHARD_SIZE) -> Path:
    """Save `model` (safetensors shards), its tokenizer, the manifest and a README into `folder`."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_manifest(out, manifest)
    (out / "README.md").write_text(readme.rstrip() + "\n")
    return out


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the safetensors files in a folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers to `dtype` in place, except those transformers keeps in float32.

    Models list such modules in `_keep_in_fp32_modules_strict` (kept for bf16 and fp16) and
    `_keep_in_fp32_modules` (kept for fp16); names are matched as transformers does, by search.
    """
    keep: set[str] = set()
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    pattern = re.compile("|".join(re.escape(k) for k in sorted(keep))) if keep else None
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or tensor.dtype == dtype:
                continue
            target = torch.float32 if pattern is not None and pattern.search(name) else dtype
            tensor.data = tensor.data.to(target)
    return model
