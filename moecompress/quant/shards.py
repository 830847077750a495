"""Write a safetensors checkpoint incrementally, one group of tensors at a time.

Layer-at-a-time quantisation produces one decoder layer's tensors at a time; `ShardWriter`
buffers them and writes a shard whenever `max_shard_bytes` is reached, so at most one shard is
held in memory. `close()` names the shards `model-0000i-of-0000n.safetensors` (or
`model.safetensors` when there is one) and writes `model.safetensors.index.json`, the layout
`from_pretrained` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"


class ShardWriter:
    """Accumulates named tensors into safetensors shards in `folder`."""

    def __init__(self, folder: str | Path, max_shard_bytes: int = 2 * 10**9, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.names: set[str] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue tensors (names must be unique across the checkpoint); flushes full shards."""
        for name, tensor in tensors.items():
            if name in self.names:
                raise ValueError(f"tensor {name!r} written twice")
            self.names.add(name)
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self.pending[name] = tensor.detach().to("cpu", copy=True).contiguous()  # own storage (no shared views)
            self.pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.folder / f".shard-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(path), metadata=self.metadata)
        self.written.append((path, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names and write the index; returns the files."""
        self._flush()
        count = len(self.written)
        if count == 1:
            final = self.folder / "model.safetensors"
            self.written[0][0].rename(final)
            return [final]
        files, weight_map = [], {}
        for i, (path, names) in enumerate(self.written):
            final = self.folder / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files
