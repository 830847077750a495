"""The prepared GPU check script runs its CPU half here and refuses cleanly without a CUDA device."""

from __future__ import annotations

import torch

from benchmarks import gpu_check


def test_cpu_half_and_no_device_exit(tmp_path) -> None:
    gpu_check.build_checkpoint(tmp_path / "model", layers=1)
    result = gpu_check.run_device(tmp_path / "model", "cpu", layers=1)
    assert result["keep"] and result["seconds_per_layer"] > 0
    assert all(t.dtype == torch.float64 for t in result["stats"].tensors.values())
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 2


def test_quantize_half_on_the_cpu(tmp_path) -> None:
    gpu_check.build_checkpoint(tmp_path / "model", layers=1)
    result = gpu_check.quantize_on_devices(tmp_path / "model", tmp_path, devices=("cpu",))
    assert set(result) == {"cpu"} and result["cpu"]["seconds"] > 0
    assert result["cpu"]["bits"] and torch.isfinite(result["cpu"]["logits"]).all()
