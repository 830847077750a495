"""`moecompress condense` end to end on tiny checkpoints saved in tmp_path.

Qwen3-MoE can hold dense layers anywhere (mlp_only_layers): the output is a stock checkpoint.
Qwen2-MoE gates its shared expert per token: the output is moecompress's layout. Both are
re-opened the way a user would and compared with an independent in-memory condensation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moecompress
from moecompress.condense.apply import condense_model, load_condensed
from moecompress.models.load import load_model
from tests.cli_helpers import error_lines, make_checkpoint, run_cli
from tests.helpers import token_batch
from tests.tiny_tokenizer import sample_text

DATA_ARGS = ["--samples", "4", "--seq-len", "32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("condense")
    (root / "text.txt").write_text(sample_text())
    return {"qwen3_moe": make_checkpoint(root / "qwen3_moe", "qwen3_moe"),
            "qwen2_moe": make_checkpoint(root / "qwen2_moe", "qwen2_moe"), "data": root / "text.txt"}


def _expected_logits(checkpoint: Path, manifest: dict, ids: torch.Tensor) -> torch.Tensor:
    """Condense the original checkpoint in memory with the manifest's plan (independent of the writer)."""
    model, adapter = load_model(checkpoint)
    plan = manifest["plan"]
    condense_model(model, adapter, {int(i): (plan["experts"][i], plan["weights"][i]) for i in plan["experts"]})
    with torch.no_grad():
        return model(ids).logits


def test_auto_layers_write_a_stock_checkpoint(checkpoints, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli(["condense", str(checkpoints["qwen3_moe"]), "--layers", "auto", "--num-layers", "1",
                                 "--experts", "2", "--data", str(checkpoints["data"]), *DATA_ARGS, "-o", str(out)],
                                monkeypatch, capsys)
    assert code == 0, err
    for text in ("Condensed: 1 layer(s)", "parameters:", "bytes on disk:", "CPU forward", "search cost:",
                 "from_pretrained"):
        assert text in stdout
    manifest = json.loads((out / "moecompress_manifest.json").read_text())
    assert manifest["operation"] == "condense" and manifest["layout"] == "transformers"
    assert manifest["calibration"]["num_tokens"] == 4 * 32
    layers = manifest["plan"]["layers"]
    assert len(layers) == 1 and layers[0] in (1, 2)
    assert json.loads((out / "condense_plan.json").read_text())["layers"] == layers
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert layers[0] in reloaded.config.mlp_only_layers
    ids = token_batch(reloaded.config.vocab_size)
    with torch.no_grad():
        got = reloaded(ids).logits
    torch.testing.assert_close(got, _expected_logits(checkpoints["qwen3_moe"], manifest, ids), atol=1e-4, rtol=1e-4)


def test_gated_shared_expert_writes_the_moecompress_layout(checkpoints, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli(["condense", str(checkpoints["qwen2_moe"]), "--layers", "1,2", "--experts", "3",
                                 "--data", str(checkpoints["data"]), *DATA_ARGS, "--no-timing", "-o", str(out)],
                                monkeypatch, capsys)
    assert code == 0, err
    assert "moecompress.load" in stdout and "shared_expert_gate" in stdout
    manifest = json.loads((out / "moecompress_manifest.json").read_text())
    assert manifest["layout"] == "moecompress" and sorted(manifest["plan"]["layers"]) == [1, 2]
    assert not (out / "model.safetensors").exists() and (out / "moecompress_layout.json").is_file()
    model = load_condensed(out)
    assert moecompress.load(out).state_dict().keys() == model.state_dict().keys()
    ids = token_batch(model.config.vocab_size)
    expected = _expected_logits(checkpoints["qwen2_moe"], manifest, ids)
    for opened in (model, moecompress.load(out)):  # the layout loader, and the user-facing entry point
        with torch.no_grad():
            got = opened(ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dry_run_writes_nothing(checkpoints, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "never"
    code, stdout, err = run_cli(["condense", str(checkpoints["qwen3_moe"]), "--layers", "2", "--criterion", "js",
                                 "--data", str(checkpoints["data"]), *DATA_ARGS, "--no-timing", "--dry-run",
                                 "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert "Planned: 1 layer(s)" in stdout and "would write the transformers layout" in stdout
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--layers", "0"], "not MoE layers"),
    (["--layers", "1", "--experts", "9"], "--experts"),
    (["--layers", "x"], "--layers"),
    (["--layers", "1", "--criterion", "kl"], "criterion"),
])
def test_bad_options_are_one_line_errors(checkpoints, tmp_path, monkeypatch, capsys, args, message) -> None:
    code, _, err = run_cli(["condense", str(checkpoints["qwen3_moe"]), *args, "--data", str(checkpoints["data"]),
                            *DATA_ARGS, "-o", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and message in lines[0]


def test_transformers_layout_refused_for_gated_shared_expert(checkpoints, tmp_path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(["condense", str(checkpoints["qwen2_moe"]), "--layers", "2", "--layout", "transformers",
                            "--data", str(checkpoints["data"]), *DATA_ARGS, "-o", str(tmp_path / "out")],
                           monkeypatch, capsys)
    assert code == 2
    assert "shared_expert_gate" in error_lines(err)[0] and not (tmp_path / "out").exists()
