"""Cached hidden states in memory-mapped files, for calibration sets larger than the memory budget.

The layer engine caches every calibration batch's hidden states between decoder layers:
windows x tokens x hidden size values (1024 windows of 4096 tokens at DeepSeek-V3's 7168 are
120 GB in float32). When they do not fit the budget, each batch's states live in a file
instead, mapped into memory (`torch.from_file(..., shared=True)`): their pages are the page
cache's, which the kernel writes back and drops under memory pressure, so only the batch
being computed needs to be resident. Each batch has two files: a layer reads a batch's input
from one while its output is written into the other, and the next layer swaps them.
Values are copied bit for bit, so statistics equal those of an in-memory cache.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch


class SpilledActivations:
    """A folder of memory-mapped files holding the cached hidden states, two per batch."""

    def __init__(self, parent: str | Path | None = None) -> None:
        """parent: where the folder is made (default: the system's temporary folder, $TMPDIR)."""
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="moecompress-activations-", dir=parent))
        self._turn: dict[int, int] = {}  # batch -> which of its two files the next write goes to

    def keep(self, batch: int, value: torch.Tensor) -> torch.Tensor:
        """A file-backed copy of `value` (B, S, H), batch `batch`'s cached states from now on."""
        turn = self._turn.get(batch, 0)
        self._turn[batch] = 1 - turn
        path = self.folder / f"batch-{batch:05d}-{turn}.bin"
        nbytes = value.numel() * value.element_size()
        with open(path, "r+b" if path.exists() else "wb") as handle:  # never zeroed: only resized when needed
            handle.truncate(nbytes)
        stored = torch.from_file(str(path), shared=True, size=value.numel(), dtype=value.dtype).view(value.shape)
        stored.copy_(value.detach())
        return stored

    def close(self) -> None:
        """Remove the files (the cached states they held are gone)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def __del__(self) -> None:
        self.close()
