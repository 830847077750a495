"""Write a Hugging Face checkpoint folder: sharded safetensors, config, tokenizer, manifest, README."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
