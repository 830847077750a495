"""quantize and compress read layer by layer write exactly what the whole-model path writes.

Each command runs twice on the same checkpoint: as shipped (the checkpoint read one decoder
layer at a time through `CheckpointReader`) and with the whole model loaded in memory (the
path GEMQ still takes). Every tensor of the two outputs must be equal bit for bit, and the
streamed output must reload with moecompress's loader.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moecompress.quant.run as quant_run
from moecompress.quant.load import load_quantized
from tests.cli_helpers import make_checkpoint, run_cli
from tests.tiny_tokenizer import sample_text

CALIB = ["--samples", "2", "--seq-len", "32", "--batch-size", "2", "--min-tokens", "2", "--group-size", "32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen3_moe") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("data")
    (folder / "text.txt").write_text(sample_text())
    return ["--data", f"text={folder / 'text.txt'}"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


@pytest.mark.parametrize("command", [["quantize", "--bits", "2.5"], ["compress", "--size", "40%"]])
def test_streamed_equals_whole_model(command, checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    streamed = tmp_path / "streamed"
    code, _, err = run_cli([command[0], str(checkpoint), *command[1:], *data, *CALIB, "-o", str(streamed)],
                           monkeypatch, capsys)
    assert code == 0, err
    original = quant_run.check_model_support
    calls = []

    def whole_model(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(original(*args, **kwargs))
        return False

    monkeypatch.setattr(quant_run, "check_model_support", whole_model)
    whole = tmp_path / "whole"
    code, _, err = run_cli([command[0], str(checkpoint), *command[1:], *data, *CALIB, "-o", str(whole)],
                           monkeypatch, capsys)
    assert code == 0, err
    assert calls == [True]  # the shipped path did stream
    a, b = _tensors(streamed), _tensors(whole)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    model, _ = load_quantized(streamed)
    assert not any(p.device.type == "meta" for p in model.parameters())
