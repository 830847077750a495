"""The ``scale`` suite's FP8 variant of DeepSeek-V3 (as published) on shrunken shapes: layout, values, suite, report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.scale.cgroup import CapResult
from benchmarks.scale.checkpoints import (build_checkpoint, check_free_space, ensure_room, expected_bytes,
                                          is_fp8_weight, on_disk_shapes)
from benchmarks.scale.specs import DEEPSEEK_V3_FP8_QUANTIZATION, SPECS
from tests.benchmarks.test_scale import SHRUNK, _header

SPEC = "deepseek_v3_fp8"
REPO = Path(__file__).resolve().parents[2]
# SHRUNK's DeepSeek: kv_a_proj_with_mqa has 16 + 8 = 24 rows, so 16-row blocks leave a partial edge block (as the
# real 576 rows do in 128-blocks); at the published 128x128 every shrunken matrix is one partial block.
BLOCKS = {"published": None, "16x16": [16, 16]}
ENVIRONMENT = {"date": "2026-01-01T00:00:00+00:00", "machine": "Linux x86_64, 2 CPUs", "python": "3", "torch": "2",
               "torch_threads": 1, "transformers": "5", "tokenizers": "0", "git_commit": "abc1234"}


def _overrides(block: list[int] | None) -> dict[str, Any]:
    if block is None:
        return dict(SHRUNK["deepseek_v3"])
    quantization = {**DEEPSEEK_V3_FP8_QUANTIZATION, "weight_block_size": block}
    return {**SHRUNK["deepseek_v3"], "quantization_config": quantization}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in folder.glob("*.safetensors"):
        out.update(load_file(path))
    return out


@pytest.fixture(scope="module", params=sorted(BLOCKS))
def built(request, tmp_path_factory) -> tuple[Path, dict[str, Any], tuple[int, int]]:
    """A 3-layer shrunken FP8 checkpoint (1 dense + 2 MoE layers), its record and its block."""
    block = BLOCKS[request.param]
    folder = tmp_path_factory.mktemp(f"fp8-{request.param}")
    record = build_checkpoint(folder, SPEC, 3, overrides=_overrides(block))
    return folder, record, tuple(block or DEEPSEEK_V3_FP8_QUANTIZATION["weight_block_size"])


def test_fp8_checkpoint_stores_every_tensor_as_published(built):
    folder, record, block = built
    header = _header(folder)
    weights = {name: entry for name, entry in header.items() if not name.endswith("_scale_inv")}
    fp8 = {name for name, entry in weights.items() if entry["dtype"] == "F8_E4M3"}
    assert fp8 == {name for name, entry in weights.items() if is_fp8_weight(name, tuple(entry["shape"]))}
    for name in fp8:  # a float32 scale per block, partial edge blocks included
        rows, cols = header[name]["shape"]
        scale = header[name + "_scale_inv"]
        assert scale["dtype"] == "F32" and scale["shape"] == [-(-rows // block[0]), -(-cols // block[1])]
    assert len(header) == record["tensors"] == len(weights) + len(fp8)
    expected_fp8 = ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_b_proj.weight",
                    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.self_attn.kv_b_proj.weight",
                    "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                    "model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.experts.7.up_proj.weight",
                    "model.layers.1.mlp.experts.0.down_proj.weight",
                    "model.layers.1.mlp.shared_experts.gate_proj.weight"]
    assert set(expected_fp8) <= fp8
    assert header["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]["shape"] == [24, 64]
    bf16 = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.1.input_layernorm.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"]
    assert all(header[name]["dtype"] == "BF16" for name in bf16)
    assert header["model.layers.2.mlp.gate.e_score_correction_bias"]["dtype"] == "F32"
    assert not any(".layers.0.mlp.experts." in name for name in header)  # layer 0 is the dense one
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == {**DEEPSEEK_V3_FP8_QUANTIZATION, "weight_block_size": list(block)}
    assert "modules_to_not_convert" not in config["quantization_config"]
    assert config["first_k_dense_replace"] == 1 and config["num_hidden_layers"] == 3
    assert record["weights"] == f"FP8 e4m3 in {block[0]}x{block[1]} blocks"
    assert record["bytes"] > expected_bytes(SPEC, 3, record["overrides"])  # the data plus the shards' headers
    assert sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in header.values()) == expected_bytes(
        SPEC, 3, record["overrides"])


def test_fp8_values_dequantise_to_the_bf16_init(built):
    from moecompress.io.stored_formats import dequantize_fp8_blocks

    folder, _, block = built
    tensors = _tensors(folder)
    codes = [tensor for tensor in tensors.values() if tensor.dtype == torch.float8_e4m3fn]
    raw = torch.cat([tensor.view(torch.uint8).flatten() for tensor in codes])
    assert not ((raw == 0x7F) | (raw == 0xFF)).any()  # no NaN code
    values = []
    for name, tensor in tensors.items():
        if tensor.dtype == torch.float8_e4m3fn:
            scale = tensors[name + "_scale_inv"]
            assert 5e-4 <= scale.min() and scale.max() <= 2e-3
            weight = dequantize_fp8_blocks(tensor, scale, block, torch.float32)
            assert torch.isfinite(weight).all()
            values.append(weight.flatten())
    std = torch.cat(values).std().item()
    assert 0.015 < std < 0.026  # about the bf16 variant's N(0, 0.02)


def test_moecompress_reads_it_as_fp8(built):
    from transformers import AutoConfig

    from moecompress.io.stored_formats import StoredTensors, open_tensors

    folder, _, block = built
    if block == (128, 128):  # the CLI once (a child process takes seconds)
        found = subprocess.run([sys.executable, "-m", "moecompress", "inspect", str(folder), "--json"], cwd=REPO,
                               capture_output=True, text=True, check=True, timeout=120)
        summary = json.loads(found.stdout)
        assert summary["stored_format"]["method"] == "fp8"
        assert summary["stored_format"]["quantization_config"] == DEEPSEEK_V3_FP8_QUANTIZATION
        assert summary["dense_layer_indices"] == [0] and summary["moe_layer_indices"] == [1, 2]
    view = open_tensors(sorted(folder.glob("*.safetensors")), AutoConfig.from_pretrained(folder))
    assert isinstance(view, StoredTensors)
    name = "model.layers.1.mlp.experts.3.gate_proj.weight"
    assert view.is_quantized(name) and not view.is_quantized("model.layers.1.mlp.gate.weight")
    assert not any(n.endswith("_scale_inv") for n in view.names())
    assert all(torch.isfinite(view.tensor(n).float()).all() for n in view.names())


def test_shallow_fp8_configs_keep_one_dense_layer():
    spec = SPECS[SPEC]
    assert spec.config_dict(2)["first_k_dense_replace"] == 1 and spec.config_dict(3)["first_k_dense_replace"] == 1
    assert spec.config_dict(61)["first_k_dense_replace"] == 3
    assert spec.config_dict(2)["quantization_config"] == DEEPSEEK_V3_FP8_QUANTIZATION
    spec.config_dict(2)["quantization_config"]["weight_block_size"].append(1)  # a copy: the published dict is intact
    assert DEEPSEEK_V3_FP8_QUANTIZATION["weight_block_size"] == [128, 128]
    assert "quantization_config" not in SPECS["deepseek_v3"].config_dict(2)  # the bf16 variant stays bf16


def test_real_fp8_shapes_and_sizes_on_the_meta_device():
    shapes = on_disk_shapes(SPECS[SPEC].config(2))
    assert shapes["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == (576, 7168)
    experts = [name for name in shapes if re.search(r"layers\.1\.mlp\.experts\.\d+\.gate_proj\.weight$", name)]
    assert len(experts) == 256 and shapes[experts[0]] == (2048, 7168)
    two, three = expected_bytes(SPEC, 2), expected_bytes(SPEC, 3)
    moe_layer = three - two
    assert 256 * 3 * 7168 * 2048 < moe_layer < 1.03 * 256 * 3 * 7168 * 2048  # codes, scales, attention, router
    assert 15.5e9 < two < 16.1e9 and 27.0e9 < three < 27.6e9


def test_a_build_that_cannot_fit_is_refused_before_writing(tmp_path):
    with pytest.raises(SystemExit, match="needs"):
        check_free_space(tmp_path, 1 << 60, "checkpoint x")
    ensure_room(SPEC, [2], _overrides(None), root=tmp_path)  # a shrunken one fits


# ---------------------------------------------------------------------------------------------- suite and report


def test_fp8_spec_settings_and_result_key(monkeypatch):
    from benchmarks.scale import suite as scale_suite

    monkeypatch.delenv("MOECOMPRESS_SCALE_QUICK", raising=False)
    monkeypatch.delenv("MOECOMPRESS_SCALE_COMMANDS", raising=False)
    monkeypatch.delenv(scale_suite.SPEC_ENV, raising=False)
    default = scale_suite.settings({})
    assert default.spec == "qwen3_30b_a3b" and default.depths == [2, 4, 6, 8] and default.commands == ()
    s = scale_suite.settings({"scale_spec": SPEC})
    assert (s.timing_depths, s.cap_depth, s.depths, s.commands) == ((2,), 2, [2], ("prune frequency",))
    monkeypatch.setenv(scale_suite.SPEC_ENV, SPEC)
    assert scale_suite.settings({}).spec == SPEC
    quick = scale_suite.settings({"scale_quick": True, "scale_commands": ["calibrate"]})
    assert quick.depths == [1, 2] and quick.quick and quick.commands == ("calibrate",)
    assert scale_suite.settings({"scale_cap_depth": 3}).cap_depth == 3
    with pytest.raises(SystemExit, match="unknown scale spec"):
        scale_suite.settings({"scale_spec": "nope"})
    assert scale_suite.result_key("qwen3_30b_a3b") == "scale"
    assert scale_suite.result_key(SPEC) == "scale-deepseek-v3-fp8"
    assert scale_suite.suite_title("qwen3_30b_a3b") == scale_suite.TITLE
    assert scale_suite.suite_title(SPEC).startswith("Scale, DeepSeek-V3 (FP8 blocks, as published): ")
    with pytest.raises(SystemExit, match="benchmarks.scale --spec deepseek_v3_fp8"):
        scale_suite.scale([], {})  # the harness's suite is stored as scale.json: it refuses another spec


def _fake_run(argv, cap, timeout, cwd=None, env=None, parse_stderr=None) -> CapResult:
    """A child run that needs 1000 + 100 x layers bytes and takes 10 + 5 x layers seconds."""
    layers = int(re.search(r"-L(\d+)-", argv[4]).group(1))
    need = 1000 + 100 * layers
    ok = cap is None or cap >= need
    Path(argv[argv.index("-o") + 1]).mkdir()
    seconds = 10.0 + 5.0 * layers
    return CapResult(argv=list(argv), cap_bytes=cap, ok=ok, returncode=0 if ok else -9, seconds=seconds,
                     cpu_seconds=2 * seconds, max_usage=need, peak_rss=need, failcnt=0, oom_kills=0 if ok else 1)


def _fake_freeze(repo: Path, dest: Path, source: str = "worktree") -> dict[str, Any]:
    """The frozen copy without git (tested on its own in test_scale.py)."""
    return {"source": source, "commit": "abc1234", "path": str(dest), "worktree_differs_from_head": False,
            "sha256": "0" * 64}


def test_fp8_suite_and_its_own_results_section(tmp_path, monkeypatch):
    """The suite on shrunken FP8 checkpoints (child runs faked), stored beside a Qwen3 result, both rendered."""
    from benchmarks.harness.context import Protocol
    from benchmarks.harness.report import render_results, save_suite, write_results
    from benchmarks.scale import __main__ as scale_main
    from benchmarks.scale import suite as scale_suite

    monkeypatch.setenv("MOECOMPRESS_SCALE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MOECOMPRESS_SCALE_QUICK", raising=False)
    monkeypatch.delenv("MOECOMPRESS_SCALE_COMMANDS", raising=False)
    monkeypatch.setattr(scale_suite, "unavailable_reason", lambda: None)
    monkeypatch.setattr(scale_suite, "run_capped", _fake_run)
    monkeypatch.setattr(scale_suite, "freeze", _fake_freeze)
    s = scale_suite.settings({"scale_spec": SPEC, "scale_overrides": _overrides([16, 16]),
                              "scale_fractions": (0.001, 0.5, 1.0), "scale_timing_depths": (2, 3),
                              "scale_sweep_depths": (2, 3), "scale_commands": ["calibrate", "prune frequency"]})
    data = scale_suite.measure(s)
    assert [(row["command"], row["layers"]) for row in data["timings"]] == [
        ("calibrate", 2), ("calibrate", 3), ("prune frequency", 2), ("prune frequency", 3)]
    assert data["fits"][0]["wall_seconds_per_layer"] == 5.0 and data["fits"][0]["full_layers"] == 61
    assert [cap["layers"] for cap in data["caps"]] == [2, 2] and all(cap["fraction"] for cap in data["caps"])
    assert data["spec"]["weights"] == "FP8 e4m3 in 16x16 blocks"
    assert data["checkpoints"]["2"]["weights"] == "FP8 e4m3 in 16x16 blocks"
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [name.split("-")[:2] for name in names[:-1]] == [[SPEC, "L2"], [SPEC, "L3"]]
    assert names[-1] == "progress.jsonl"

    qwen = {"suite": "scale", "title": scale_suite.TITLE, "environment": ENVIRONMENT, "protocol": Protocol().as_dict(),
            "fixtures": {}, "seconds": 60.0, "data": scale_suite.measure(scale_suite.settings(
                {"scale_quick": True, "scale_overrides": SHRUNK["qwen3_30b_a3b"], "scale_commands": ["calibrate"]}))}
    results = tmp_path / "results"
    before = save_suite("scale", qwen, results).read_text()
    monkeypatch.setattr(scale_main, "measure", lambda chosen: data)
    monkeypatch.setattr(scale_main, "environment", lambda: ENVIRONMENT)  # no git
    scale_main.main(["--spec", SPEC, "--results-dir", str(results), "--output", str(tmp_path / "RESULTS.md")])
    assert sorted(p.name for p in results.iterdir()) == ["scale-deepseek-v3-fp8.json", "scale.json"]
    assert (results / "scale.json").read_text() == before  # the Qwen3 result is left alone
    stored = json.loads((results / "scale-deepseek-v3-fp8.json").read_text())
    assert stored["suite"] == "scale-deepseek-v3-fp8" and stored["title"] == scale_suite.suite_title(SPEC)
    text = (tmp_path / "RESULTS.md").read_text()
    assert write_results(results, tmp_path / "again.md").read_text() == text == render_results(
        {"scale": json.loads(before), "scale-deepseek-v3-fp8": stored})
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [f"## {qwen['title']}", f"## {scale_suite.suite_title(SPEC)}"]
    qwen_part, fp8_part = text.split(headings[1])
    assert "Random bf16 weights" in qwen_part and "Qwen3-30B-A3B" in qwen_part and "float8" not in qwen_part
    assert "FP8 e4m3 in 16x16 blocks" in fp8_part and "DeepSeek-V3 (FP8 blocks, as published)" in fp8_part
    assert "first 3 layers are dense" in fp8_part and "of its 61 decoder layers" in fp8_part
    assert "| calibrate |" in fp8_part and "| prune frequency |" in fp8_part and "(no renderer" not in text
    assert "`benchmarks/results/scale-deepseek-v3-fp8.json`" in fp8_part
