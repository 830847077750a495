"""`moecompress inspect` and `moecompress eval` end to end on tiny checkpoints saved in tmp_path.

Commands run in-process through `moecompress.cli.app.main` (the console entry point, which
turns user errors into "error: ..." and exit code 2); one test runs the installed script.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from moecompress.evaluate import evaluate_perplexity
from moecompress.models.load import load_model, load_tokenizer
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model
from tests.cli_helpers import error_lines, run_cli
from tests.tiny_tokenizer import sample_text, save_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-MoE checkpoint (dense layer 0, MoE layers 1-2) with its own tokenizer."""
    folder = tmp_path_factory.mktemp("qwen3_moe")
    tokenizer = save_tokenizer(folder, vocab_size=300)
    config = TINY_CONFIGS["qwen3_moe"]()
    config.vocab_size = len(tokenizer)
    tiny_model(config, seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two text domains: a .txt and a .jsonl file."""
    folder = tmp_path_factory.mktemp("data")
    text = sample_text()
    half = len(text) // 2
    (folder / "code.txt").write_text(text[:half])
    records = [json.dumps({"body": part}) for part in text[half:].split("\n\n") if part.strip()]
    (folder / "more.jsonl").write_text("\n".join(records) + "\n")
    return {"txt": folder / "code.txt", "jsonl": folder / "more.jsonl"}


# ------------------------------------------------------------------ inspect


def test_inspect_table(checkpoint, monkeypatch, capsys) -> None:
    code, out, err = run_cli(["inspect", str(checkpoint)], monkeypatch, capsys)
    assert code == 0, err
    for expected in ("qwen3_moe", "Qwen3MoeAdapter", "MoE layers", "1-2 (2)", "routed experts", "attention", "total"):
        assert expected in out


def test_inspect_json(checkpoint, monkeypatch, capsys) -> None:
    code, out, err = run_cli(["inspect", str(checkpoint), "--json"], monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads(out)
    config = TINY_CONFIGS["qwen3_moe"]()
    assert summary["model_type"] == "qwen3_moe" and summary["supported"] is True
    assert summary["moe_layer_indices"] == [1, 2] and summary["dense_layer_indices"] == [0]
    assert summary["num_experts"] == config.num_experts and summary["top_k"] == config.num_experts_per_tok
    assert summary["expert_intermediate_size"] == config.moe_intermediate_size
    assert summary["shared_modules_per_layer"] == 0
    sizes = summary["sizes"]
    model, _ = load_model(checkpoint)
    assert sizes["total_params"] == sum(p.numel() for p in model.parameters())
    assert sum(role["params"] for role in sizes["roles"].values()) == sizes["total_params"]
    experts = config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size * 2
    assert sizes["roles"]["routed_experts"]["params"] == experts
    assert summary["dtype"] == "float32" and sizes["total_bytes"] == 4 * sizes["total_params"]
    assert summary["bytes_on_disk"] == (checkpoint / "model.safetensors").stat().st_size


def test_list_architectures(monkeypatch, capsys) -> None:
    from moecompress.models.adapters import supported_model_types

    code, out, _ = run_cli(["inspect", "--list-architectures", "--json"], monkeypatch, capsys)
    assert code == 0
    listed = json.loads(out)
    assert listed["supported"] == supported_model_types() and "qwen3_moe" in listed["supported"]
    assert isinstance(listed["unsupported"], dict)
    code, out, _ = run_cli(["inspect", "--list-architectures"], monkeypatch, capsys)
    assert code == 0 and "qwen3_moe" in out and "supported" in out


def test_inspect_dense_model_is_refused(tmp_path, monkeypatch, capsys) -> None:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    code, _, err = run_cli(["inspect", str(tmp_path)], monkeypatch, capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "dense" in line and "supported:" in line and "qwen3_moe" in line


def test_inspect_missing_folder(tmp_path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(["inspect", str(tmp_path / "nowhere")], monkeypatch, capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "does not exist" in line


def test_inspect_without_model(monkeypatch, capsys) -> None:
    code, _, err = run_cli(["inspect"], monkeypatch, capsys)
    assert code == 2 and "--list-architectures" in error_lines(err)[0]


def test_inspect_corrupt_safetensors(checkpoint, tmp_path, monkeypatch, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{this is not a header}")
    code, _, err = run_cli(["inspect", str(broken)], monkeypatch, capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "model.safetensors" in line and "corrupt" in line


# ------------------------------------------------------------------ eval


def test_eval_table_and_json_file(checkpoint, data_files, tmp_path, monkeypatch, capsys) -> None:
    out_file = tmp_path / "results" / "eval.json"
    args = [
        "eval", str(checkpoint),
        "--data", f"code={data_files['txt']}", "--data", f"more={data_files['jsonl']}", "--field", "body",
        "--seq-len", "32", "--windows", "3", "--batch-size", "2", "--json-out", str(out_file),
    ]  # fmt: skip
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "code" in out and "more" in out and "mean" in out and "perplexity" in out
    saved = json.loads(out_file.read_text())
    assert [d["domain"] for d in saved["domains"]] == ["code", "more"]
    assert all(d["windows"] == 3 and d["tokens"] == 3 * 31 for d in saved["domains"])
    assert saved["seq_len"] == 32 and saved["data"][1]["field"] == "body"

    # The CLI reports what the library computes for the same model, tokenizer and windows.
    from moecompress.calibration.data import parse_data_specs

    model, _ = load_model(checkpoint)
    sources = parse_data_specs([f"code={data_files['txt']}", f"more={data_files['jsonl']}"], field="body")
    report = evaluate_perplexity(model, load_tokenizer(checkpoint), sources, seq_len=32, max_windows=3, batch_size=2, progress=False)
    for expected, got in zip(report.results, saved["domains"]):
        assert got["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert f"{saved['mean_perplexity']:.4f}" in out

    code, _, err = run_cli(args, monkeypatch, capsys)  # the file exists now
    assert code == 2 and "--force" in error_lines(err)[0]
    code, _, err = run_cli([*args, "--windows", "1", "--force"], monkeypatch, capsys)  # last --windows wins
    assert code == 0, err
    assert [d["windows"] for d in json.loads(out_file.read_text())["domains"]] == [1, 1]


def test_eval_json_stdout(checkpoint, data_files, monkeypatch, capsys) -> None:
    args = ["eval", str(checkpoint), "--data", str(data_files["txt"]), "--seq-len", "16", "--windows", "2", "--json"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out)
    (domain,) = result["domains"]
    assert domain["domain"] == "code" and domain["windows"] == 2 and domain["tokens"] == 30
    assert torch.isfinite(torch.tensor(result["mean_perplexity"]))


def test_eval_streaming_reads_each_layer_once_and_agrees(checkpoint, data_files, monkeypatch, capsys) -> None:
    args = ["eval", str(checkpoint), "--data", str(data_files["txt"]), "--seq-len", "16", "--windows", "3",
            "--batch-size", "2", "--json"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    code, streamed, err = run_cli([*args, "--streaming"], monkeypatch, capsys)
    assert code == 0, err
    whole, layered = json.loads(out), json.loads(streamed)
    assert layered["streaming"] is True
    assert layered["domains"][0]["tokens"] == whole["domains"][0]["tokens"]
    assert layered["mean_perplexity"] == pytest.approx(whole["mean_perplexity"], rel=1e-5)


def test_eval_user_errors(checkpoint, data_files, tmp_path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(["eval", str(checkpoint), "--data", f"x={tmp_path / 'none.txt'}"], monkeypatch, capsys)
    assert code == 2 and "does not exist" in error_lines(err)[0]
    args = ["eval", str(checkpoint), "--data", str(data_files["txt"]), "--seq-len", "100000"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "max_position_embeddings" in error_lines(err)[0]
    code, _, err = run_cli(["eval", str(tmp_path / "missing")], monkeypatch, capsys)
    assert code == 2 and "does not exist" in error_lines(err)[0]


def test_installed_console_script(checkpoint) -> None:
    script = Path(sys.executable).parent / "moecompress"
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    done = subprocess.run([str(script), "inspect", str(checkpoint.parent / "missing")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: ")
