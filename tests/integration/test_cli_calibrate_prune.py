"""`moecompress calibrate` and `moecompress prune` end to end on a tiny checkpoint.

The pruned checkpoint is re-opened with plain `AutoModelForCausalLM.from_pretrained` and its
logits compared with the original model's logits with the same experts masked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.calibration.stats import RoutingStats
from moecompress.io.manifest import read_manifest
from moecompress.models.adapters import get_adapter
from tests.cli_helpers import error_lines, make_checkpoint, run_cli, write_two_domains
from tests.helpers import token_batch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    first, second = write_two_domains(tmp_path_factory.mktemp("data"))
    return [f"a={first}", f"b={second}"]


def _data_args(data: list[str]) -> list[str]:
    return [arg for item in data for arg in ("--data", item)]


def test_calibrate_writes_stats_and_refuses_overwrite(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "stats"
    args = ["calibrate", str(checkpoint), *_data_args(data), "--samples", "4", "--seq-len", "32", "-o", str(out)]
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    stats = RoutingStats.load(out, expect_config=AutoModelForCausalLM.from_pretrained(checkpoint).config)
    assert stats.header.domains == ["a", "b"]
    layer = stats.header.moe_layers[0]
    assert stats.get("count", layer).sum() == 2 * 4 * 32 * stats.header.top_k
    assert "Routing statistics" in stdout
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "--force" in error_lines(err)[0]
    code, _, err = run_cli(args + ["--force"], monkeypatch, capsys)
    assert code == 0, err


def test_prune_reloads_in_transformers_and_equals_masked(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "pruned"
    before = sorted(p.name for p in checkpoint.iterdir())
    code, stdout, err = run_cli(["prune", str(checkpoint), "--method", "reap", "--ratio", "0.5", *_data_args(data),
                                 "--samples", "4", "--seq-len", "32", "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert sorted(p.name for p in checkpoint.iterdir()) == before  # input untouched
    manifest = read_manifest(out)
    assert manifest["method"] == "reap" and manifest["calibration"]["domains"] == ["a", "b"]
    keep = {int(k): v for k, v in manifest["plan"]["keep"].items()}
    assert all(len(v) == 4 for v in keep.values())
    original = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    adapter = get_adapter(original)
    assert adapter.num_experts(pruned.config) == 4
    ids = token_batch(original.config.vocab_size)
    with torch.no_grad(), adapter.mask_experts(original, keep):
        expected = original(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, expected, atol=2e-5, rtol=1e-4)
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "prune_plan.json").read_text())["method"] == "reap"


def test_prune_dry_run_and_infeasible_ratio(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    stats_dir = tmp_path / "stats"
    code, _, err = run_cli(["calibrate", str(checkpoint), *_data_args(data), "--samples", "2", "--seq-len", "32",
                            "-o", str(stats_dir)], monkeypatch, capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["prune", str(checkpoint), "--method", "frequency", "--keep", "3", "--stats",
                                 str(stats_dir), "--dry-run"], monkeypatch, capsys)
    assert code == 0, err
    assert "Planned" in stdout and "3/8" in stdout
    assert not (tmp_path / "pruned").exists()
    code, _, err = run_cli(["prune", str(checkpoint), "--method", "frequency", "--ratio", "0.9", "--stats",
                            str(stats_dir), "-o", str(tmp_path / "x")], monkeypatch, capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "top_k=2" in line and "feasible counts: 2, 3, 4, 5, 6, 7, 8" in line
    code, _, err = run_cli(["prune", str(checkpoint), "--method", "nope", "--ratio", "0.5", "--stats", str(stats_dir),
                            "-o", str(tmp_path / "x")], monkeypatch, capsys)
    assert code == 2 and "available:" in error_lines(err)[0]
    assert not (tmp_path / "x").exists()


def test_prune_keeps_the_input_dtype(tmp_path, monkeypatch, capsys) -> None:
    import torch as _torch

    from moecompress.models.load import inspect_checkpoint
    from moecompress.sizes import checkpoint_dtype

    source = make_checkpoint(tmp_path / "bf16")
    AutoModelForCausalLM.from_pretrained(source, dtype=_torch.bfloat16).save_pretrained(source)
    out = tmp_path / "pruned"
    code, _, err = run_cli(["prune", str(source), "--method", "frequency", "--ratio", "0.5", "--samples", "2",
                            "--seq-len", "16", "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert checkpoint_dtype(inspect_checkpoint(out)) == _torch.bfloat16
    assert sum(p.stat().st_size for p in out.glob("*.safetensors")) < sum(
        p.stat().st_size for p in source.glob("*.safetensors"))
