"""NaN or Inf in weights, activations, GPTQ statistics or sensitivities is reported with where it is, never written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from moecompress.engine.layers import LayerEngine
from moecompress.engine.reader import CheckpointReader
from moecompress.errors import MoecompressError
from tests.cli_helpers import error_lines, make_checkpoint, run_cli
from tests.helpers import token_batch


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def poisoned(tmp_path) -> tuple[Path, str]:
    """A tiny checkpoint with one NaN in one routed expert's weight; (folder, that tensor's name)."""
    folder = make_checkpoint(tmp_path / "ckpt")
    shard = folder / "model.safetensors"
    tensors = load_file(str(shard))
    name = next(key for key in tensors if "layers.1." in key and "experts" in key and key.endswith("weight"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return folder, name


def test_nan_in_a_weight_is_one_line_and_nothing_is_written(poisoned, tmp_path, monkeypatch, capsys) -> None:
    folder, _ = poisoned
    before = _digest(folder)
    out = tmp_path / "stats"
    code, _, err = run_cli(["calibrate", str(folder), "--samples", "2", "--seq-len", "16", "-o", str(out)],
                           monkeypatch, capsys)
    (line,) = error_lines(err)
    assert code != 0 and "NaN or Inf" in line and "model.layers.1.mlp.experts" in line
    assert not out.exists()
    assert _digest(folder) == before


def test_nan_activations_name_the_layer(tmp_path) -> None:
    folder = make_checkpoint(tmp_path / "ckpt")
    reader = CheckpointReader(folder, dtype="float32")
    engine = LayerEngine.from_reader(reader)
    engine.prepare([("code", token_batch(reader.config.vocab_size, batch=2, length=8))])
    engine.run_layer(0)
    engine.batches[0].hidden[0, 0, 0] = float("inf")  # as if layer 0 had overflowed: layer 1 turns it into NaN
    with pytest.raises(MoecompressError, match=r"decoder layer 1 produced NaN or Inf activations on the 'code'"):
        engine.run_layer(1)
    assert all(p.device.type == "meta" for p in reader.model.parameters())  # the layer was released


QUANTIZE = ["--bits", "2.5", "--samples", "2", "--seq-len", "16"]


def _poison_after(monkeypatch, cls: type, poison) -> None:  # noqa: ANN001
    """Make `cls.__call__(self, expert, ...)` run as before, then `poison(self, expert)`."""
    real = cls.__call__

    def poisoned(self, expert, *args):  # noqa: ANN001, ANN202
        real(self, expert, *args)
        poison(self, expert)

    monkeypatch.setattr(cls, "__call__", poisoned)


def test_nan_in_an_expert_hessian_names_the_expert(tmp_path, monkeypatch, capsys) -> None:
    from moecompress.quant.layer_pass import ExpertHessians

    folder = make_checkpoint(tmp_path / "ckpt")

    def nan_hessian(stats: ExpertHessians, expert: int) -> None:
        if expert == 3:
            stats.inputs[expert].hessian[0, 0] = float("nan")

    _poison_after(monkeypatch, ExpertHessians, nan_hessian)
    out = tmp_path / "q"
    code, _, err = run_cli(["quantize", str(folder), *QUANTIZE, "-o", str(out)], monkeypatch, capsys)
    (line,) = error_lines(err)
    assert code != 0 and "NaN or Inf" in line and ".experts.3 (gate/up inputs)" in line, line
    assert not out.exists() and not any(p.name.startswith(".q") for p in tmp_path.iterdir())


def test_nan_in_a_sensitivity_names_the_layer_and_expert(tmp_path, monkeypatch, capsys) -> None:
    from moecompress.quant.sensitivity import ErrorVisitor

    folder = make_checkpoint(tmp_path / "ckpt")

    def inf_error(visitor: ErrorVisitor, expert: int) -> None:
        if expert == 2:
            visitor.errors.error[expert, 0] = float("inf")

    _poison_after(monkeypatch, ErrorVisitor, inf_error)
    code, _, err = run_cli(["quantize", str(folder), *QUANTIZE, "-o", str(tmp_path / "q")], monkeypatch, capsys)
    (line,) = error_lines(err)
    assert code != 0 and "the sensitivity of expert 2 of decoder layer 1 is NaN or Inf" in line, line
