"""Cached hidden states in memory-mapped files: the same statistics as an in-memory cache, files removed after."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from moecompress.calibration.calibrate import calibrate
from moecompress.calibration.request import CalibrationRequest
from moecompress.engine.spill import SpilledActivations
from tests.cli_helpers import make_checkpoint


def test_spilled_states_are_exact_copies_in_two_files_per_batch(tmp_path: Path) -> None:
    spill = SpilledActivations(tmp_path)
    first = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    kept = spill.keep(0, first)
    assert torch.equal(kept, first) and kept.dtype == torch.bfloat16
    second = spill.keep(0, kept * 2)  # the next layer reads `kept` while writing the other file
    assert torch.equal(second, first * 2) and torch.equal(kept, first)
    assert sorted(p.name for p in spill.folder.iterdir()) == ["batch-00000-0.bin", "batch-00000-1.bin"]
    assert torch.equal(spill.keep(0, first + 1), first + 1)  # back to the first file
    spill.close()
    assert not spill.folder.exists()


def test_calibration_over_a_spilled_cache_equals_the_in_memory_one(tmp_path: Path, caplog, monkeypatch) -> None:
    model = make_checkpoint(tmp_path / "model")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where a run without checkpoints spills
    (tmp_path / "tmp").mkdir()
    folders: set[Path] = set()
    real_keep = SpilledActivations.keep

    def keep(self: SpilledActivations, batch: int, value: torch.Tensor) -> torch.Tensor:
        folders.add(self.folder)
        return real_keep(self, batch, value)

    monkeypatch.setattr(SpilledActivations, "keep", keep)
    # batches of 2: a budget under twice the cache (so that it spills) then still holds a batch's working set
    in_memory = calibrate(model, CalibrationRequest(samples=16, seq_len=64, batch_size=2), progress=False)
    assert not folders  # the default budget holds this cache
    with caplog.at_level(logging.WARNING):
        spilled = calibrate(model, CalibrationRequest(samples=16, seq_len=64, batch_size=2, max_memory="1.2MB"),
                            progress=False)
    assert "kept in memory-mapped files" in caplog.text and "lowering --batch-size" not in caplog.text
    assert [folder.parent for folder in folders] == [tmp_path / "tmp"]
    assert in_memory.tensors.keys() == spilled.tensors.keys()
    for name, tensor in in_memory.tensors.items():
        assert torch.equal(spilled.tensors[name], tensor), name
    assert list((tmp_path / "tmp").iterdir()) == []  # the files went with the pass
