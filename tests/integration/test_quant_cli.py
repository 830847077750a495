"""`moecompress quantize` and `moecompress compress` end to end on a tiny Qwen3-MoE checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moecompress.quant.run as quant_run
from moecompress.quant.load import load_quantized
from moecompress.quant.plan import QuantPlan
from tests.cli_helpers import error_lines, make_checkpoint, run_cli
from tests.helpers import token_batch
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


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "moecompress_manifest.json").read_text())


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_quantize_bits_writes_gptq_and_fake_that_agree(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    outputs = {}
    for fmt in ("gptq", "fake"):
        out = tmp_path / fmt
        code, stdout, err = run_cli(["quantize", str(checkpoint), "--bits", "2.5", "--format", fmt, *data, *CALIB,
                                     "-o", str(out)], monkeypatch, capsys)
        assert code == 0, err
        for expected in ("gemq: routed-expert bits per MoE layer", "achieved average: 2.500", "effective bits",
                         "allocation: global program", "optimal", "bytes on disk:"):  # GEMQ: the default
            assert expected in stdout
        outputs[fmt] = out
    manifest = manifest_of(outputs["gptq"])
    assert manifest["operation"] == "quantize" and manifest["format"] == "gptq" and manifest["device"] == "cpu"
    assert manifest["achieved_average_bits"] <= 2.5 + 1e-9
    assert manifest["effective_bits_per_parameter"]["routed_experts"] > manifest["achieved_average_bits"]
    assert manifest["bytes_on_disk"] < manifest["bytes_before"]
    for widths in manifest["expert_bits"].values():
        assert 4 in widths  # one expert per layer at the top width (--require-top 1)
    gptq, _ = load_quantized(outputs["gptq"])
    fake = AutoModelForCausalLM.from_pretrained(outputs["fake"], dtype=torch.float32)
    ids = token_batch(gptq.config.vocab_size, seed=3)
    torch.testing.assert_close(logits(gptq, ids), logits(fake, ids), atol=1e-5, rtol=1e-5)
    # `eval --streaming` keeps the GPTQ weights packed (dequantised at use) and scores the same
    evals = []
    for extra in ([], ["--streaming"]):
        code, stdout, err = run_cli(["eval", str(outputs["gptq"]), *data, "--seq-len", "16", "--windows", "2",
                                     "--json", *extra], monkeypatch, capsys)
        assert code == 0, err
        evals.append(json.loads(stdout))
    assert evals[1]["streaming"] is True
    assert evals[1]["mean_perplexity"] == pytest.approx(evals[0]["mean_perplexity"], rel=1e-5)
    # `inspect` on the GPTQ folder: its plan and what opens it, instead of the stock-checkpoint summary
    code, stdout, err = run_cli(["inspect", str(outputs["gptq"]), "--json"], monkeypatch, capsys)
    assert code == 0, err
    described = json.loads(stdout)
    assert described["format"] == "gptq" and described["method"] == "gemq"
    assert described["average_expert_bits"] == pytest.approx(manifest["achieved_average_bits"])
    assert described["expert_bits_per_layer"] == {str(k): v for k, v in manifest["expert_bits"].items()}
    assert described["source"] == str(checkpoint)
    assert {entry["loader"] for entry in described["opens_with"]} >= {"moecompress.load", "GPTQModel"}
    code, stdout, err = run_cli(["inspect", str(outputs["gptq"])], monkeypatch, capsys)
    assert code == 0, err
    assert "Opens with" in stdout and "GPTQModel" in stdout and "optimum" in stdout  # cells wrap: single words


def test_quantize_size_budget_global_program(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "sized"
    code, stdout, err = run_cli(["quantize", str(checkpoint), "--size", "40%", "--allocation", "global", "--json",
                                 *data, *CALIB, "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["allocation"]["scope"] == "global"
    assert summary["bytes_after"] <= 0.4 * summary["bytes_before"] * 1.02  # + tokenizer, config, manifest files
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert weights <= 0.4 * summary["bytes_before"]


def test_uniform_rtn_reads_no_data_and_gemq_runs(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "uniform"
    code, stdout, err = run_cli(["quantize", str(checkpoint), "--method", "uniform", "--bits", "3", "--rtn",
                                 "--group-size", "32", "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    plan = QuantPlan.model_validate_json((out / "quant_plan.json").read_text())
    assert {w for ws in plan.expert_bits().values() for w in ws} == {3}
    assert all(e.spec.method == "rtn" for e in plan.entries.values() if e.spec is not None)
    out = tmp_path / "gemq"
    code, stdout, err = run_cli(["quantize", str(checkpoint), "--method", "gemq", "--bits", "3", "--candidates",
                                 "2,4", "--streaming", *data, *CALIB, "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert "allocation: global program" in stdout
    assert manifest_of(out)["achieved_average_bits"] <= 3.0 + 1e-9


def test_quantize_accepts_a_pruned_checkpoint(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    pruned = tmp_path / "pruned"
    code, _, err = run_cli(["prune", str(checkpoint), "--method", "frequency", "--ratio", "0.5", *data,
                            "--samples", "2", "--seq-len", "32", "-o", str(pruned)], monkeypatch, capsys)
    assert code == 0, err
    out = tmp_path / "pruned_q"
    code, _, err = run_cli(["quantize", str(pruned), "--bits", "3", *data, *CALIB, "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    model, _ = load_quantized(out)
    assert model.config.num_experts == 4
    assert {len(ws) for ws in manifest_of(out)["expert_bits"].values()} == {4}


@pytest.mark.parametrize("args,message", [
    (["--bits", "2.5", "--size", "4GB"], "exactly one budget"),
    (["--bits", "1.5", "--candidates", "1,2"], "cannot store 1-bit"),
    (["--size", "lots"], "is not a size"),
    (["--bits", "3", "--method", "uniform", "--sensitivity-quantizer", "gptq"], "applies to --method mc-moe and gemq"),
])
def test_options_are_checked_before_any_work(checkpoint, tmp_path, monkeypatch, capsys, args, message) -> None:
    code, _, err = run_cli(["quantize", str(checkpoint), *args, "-o", str(tmp_path / "x")], monkeypatch, capsys)
    assert code == 2
    assert message in error_lines(err)[0]


def test_infeasible_programs_are_one_line_errors(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(["quantize", str(checkpoint), "--bits", "2.5", "--uniform-per-layer", *data, *CALIB,
                            "-o", str(tmp_path / "u")], monkeypatch, capsys)
    assert code == 2 and "below the narrowest candidate width 4" in error_lines(err)[0]  # {4, 8} per layer
    code, _, err = run_cli(["quantize", str(checkpoint), "--size", "1KB", *data, *CALIB, "-o", str(tmp_path / "s")],
                           monkeypatch, capsys)
    assert code == 2 and "does not even hold the non-expert weights" in error_lines(err)[0]
    assert not (tmp_path / "u").exists() and not (tmp_path / "s").exists()


def test_compress_drops_and_quantises_under_a_size(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "compressed"
    code, stdout, err = run_cli(["compress", str(checkpoint), "--size", "33%", "--prune-method", "reap", *data, *CALIB,
                                 "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert "dropped" in stdout
    manifest = manifest_of(out)
    assert manifest["operation"] == "compress"
    kept = {len(ids) for ids in manifest["pruning"]["keep"].values()}
    assert len(kept) == 1 and 2 <= kept.pop() < 8  # same count per layer, >= top-k, something dropped
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert weights <= 0.33 * manifest["bytes_before"]
    model, _ = load_quantized(out)
    assert model.config.num_experts == len(next(iter(manifest["pruning"]["keep"].values())))
    ids = token_batch(model.config.vocab_size, seed=2)
    assert torch.isfinite(logits(model, ids)).all()


# The checkpoint read layer by layer (CheckpointReader, the shipped path) against the whole model in
# memory (the path GEMQ still takes): every written tensor equal bit for bit.

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
