"""moecompress on checkpoints stored as published: FP8 block-scaled (DeepSeek-V3, Qwen3-MoE) and MXFP4 (gpt-oss).

The fixtures (`published.py`) are written without moecompress; transformers' own CPU dequantisation of the
same folders is the independent reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from moecompress.engine.reader import CheckpointReader
from moecompress.errors import MoecompressError
from moecompress.io.stored_formats import (
    StoredTensors,
    dequantize_fp8_blocks,
    dequantize_mxfp4,
    open_tensors,
    quantize_fp8_blocks,
    quantize_mxfp4,
)
from moecompress.models.load import inspect_checkpoint
from tests.cli_helpers import error_lines, run_cli
from tests.formats.published import load_with_transformers, reference_state_dict

ALL = ["fp8_deepseek", "fp8_qwen3", "mxfp4_gptoss"]
TOKENS = torch.tensor([[1, 5, 9, 33, 70, 2, 8, 120, 64, 3, 17, 400]])


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):  # noqa: ANN201
    """Run `moecompress ARGS` in-process: (exit code, stdout, stderr)."""
    return lambda *args: run_cli(list(args), monkeypatch, capsys)


@pytest.fixture
def run(cli):  # noqa: ANN001, ANN201
    """Run `moecompress ARGS`, which must succeed; its stdout."""
    def succeed(*args: str) -> str:
        code, out, err = cli(*args)
        assert code == 0, out + err
        return out
    return succeed


def _stored(folder: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor the folder stores."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                out[key] = (tensor.dtype, tuple(tensor.shape))
    return out


def _stored_bytes(folder: Path, key: str) -> bytes:
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            if key in handle.keys():
                tensor = handle.get_tensor(key)
                return tensor.contiguous().view(torch.uint8).numpy().tobytes()
    raise KeyError(key)


@pytest.mark.parametrize("name", ALL)
def test_dequantised_layers_equal_transformers(name: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(name)
    reference = reference_state_dict(folder)
    reader = CheckpointReader(folder, dtype="bfloat16")
    assert isinstance(reader.files, StoredTensors)
    model = reader.model
    layers = reader.adapter.decoder_layers(model)
    for index, layer in enumerate(layers):
        reader.load(layer)
        prefix = f"{reader.adapter.layers_path}.{index}."
        for key, value in model.state_dict().items():
            if key.startswith(prefix):
                expected = reference[key]
                assert value.shape == expected.shape, key
                assert torch.equal(value.to(expected.dtype), expected), key
        reader.release(layer)


def test_fp8_blocks_match_transformers_on_partial_blocks() -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    torch.manual_seed(0)
    weight = torch.randn(50, 70) * 3
    q, scale = quantize_fp8_blocks(weight, (16, 16), torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (4, 5)
    ours = dequantize_fp8_blocks(q, scale, (16, 16), torch.float32)
    assert torch.equal(ours, _dequantize_fp8_weight(q, scale, [16, 16], torch.float32))
    assert (ours - weight).abs().max() <= weight.abs().max() / 16
    with pytest.raises(MoecompressError, match="do not match"):
        dequantize_fp8_blocks(q, scale[:3], (16, 16))


def test_mxfp4_matches_transformers() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    stored = torch.randn(3, 40, 96)  # (E, out, in)
    blocks, scales = quantize_mxfp4(stored)
    assert blocks.shape == (3, 40, 3, 16) and scales.shape == (3, 40, 3)
    ours = dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.equal(ours.transpose(1, 2), convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    # every value within half a grid step of the block's scale: the step is at most 2 x 2^exponent
    assert ((ours - stored).abs() <= stored.abs().amax() / 3).all()
    with pytest.raises(MoecompressError, match="multiple of 32"):
        quantize_mxfp4(torch.randn(2, 40))


@pytest.mark.parametrize("name", ALL)
def test_inspect_reports_the_stored_format(name: str, request: pytest.FixtureRequest, run) -> None:  # noqa: ANN001
    folder = request.getfixturevalue(name)
    summary = json.loads(run("inspect", str(folder), "--json"))
    method = "mxfp4" if name.startswith("mxfp4") else "fp8"
    assert summary["stored_format"]["method"] == method
    assert set(summary["writes"]) == {"prune", "condense", "quantize", "compress"}
    files = open_tensors(inspect_checkpoint(folder).weight_files, inspect_checkpoint(folder).config)
    stored_total = sum(entry.nbytes for entry in files.store.entries.values())
    assert sum(summary["stored_bytes"].values()) == stored_total
    assert summary["stored_bytes"]["routed_experts"] < summary["sizes"]["roles"]["routed_experts"]["bytes"]
    text = run("inspect", str(folder))
    assert "stored as" in text and "What each command writes" in text


@pytest.mark.parametrize("name", ALL)
def test_prune_keeps_the_format_and_the_masked_logits(name: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                       run) -> None:  # noqa: ANN001
    folder = request.getfixturevalue(name)
    out = tmp_path / "pruned"
    run("prune", str(folder), "--method", "frequency", "--ratio", "0.5", "--samples", "4", "--seq-len", "64",
         "-o", str(out))
    before, after = _stored(folder), _stored(out)
    config_in = json.loads((folder / "config.json").read_text())
    config_out = json.loads((out / "config.json").read_text())
    assert config_out["quantization_config"] == config_in["quantization_config"]
    quantized_in = {d for d, _ in before.values()} - {torch.bfloat16, torch.float32}
    assert quantized_in and quantized_in <= {d for d, _ in after.values()}
    assert set(after) <= set(before)  # renumbered experts reuse input names; fused ones keep theirs
    manifest = json.loads((out / "moecompress_manifest.json").read_text())
    assert manifest["written_by"] == "tensor copy"
    plan = json.loads((out / "prune_plan.json").read_text())
    # the kept experts' stored bytes (weights and their scales) are the input's
    layer, kept = next((int(k), v) for k, v in plan["keep"].items())
    for key in before:
        marker = f"layers.{layer}.mlp.experts.{kept[0]}."
        if marker in key:
            assert _stored_bytes(out, key.replace(marker, f"layers.{layer}.mlp.experts.0.")) == _stored_bytes(folder, key)
    # transformers reloads the output; its logits equal the input's with the dropped experts masked
    original = load_with_transformers(folder)
    pruned = load_with_transformers(out)
    adapter = inspect_checkpoint(folder).adapter
    keep = {int(k): v for k, v in plan["keep"].items()}
    with torch.no_grad(), adapter.mask_experts(original, keep):
        expected = original(TOKENS).logits
    with torch.no_grad():
        got = pruned(TOKENS).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_neuron_pruning_requantises_changed_matrices(fp8_qwen3: Path, tmp_path: Path, run) -> None:  # noqa: ANN001
    out = tmp_path / "heapr"
    run("prune", str(fp8_qwen3), "--method", "heapr", "--ratio", "0.333333", "--allocation", "uniform",
         "--samples", "4", "--seq-len", "64", "-o", str(out))
    before, after = _stored(fp8_qwen3), _stored(out)
    gate = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert after[gate][0] == torch.float8_e4m3fn and after[gate][1][0] < before[gate][1][0]
    assert after[gate + "_scale_inv"][1] == (-(-after[gate][1][0] // 16), before[gate + "_scale_inv"][1][1])
    attention = "model.layers.1.self_attn.q_proj.weight"
    assert _stored_bytes(out, attention) == _stored_bytes(fp8_qwen3, attention)  # unchanged: copied
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert "re-quantised" in (out / "README.md").read_text()
    model = load_with_transformers(out)
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS).logits).all()


def test_merging_requantises_the_merged_experts(fp8_qwen3: Path, tmp_path: Path, run) -> None:  # noqa: ANN001
    """--merge writes new expert values: re-quantised in the input's FP8 blocks; what merging left alone is copied."""
    out = tmp_path / "merged"
    run("prune", str(fp8_qwen3), "--method", "frequency", "--ratio", "0.5", "--merge", "centroid", "--samples", "4",
        "--seq-len", "64", "-o", str(out))
    plan = json.loads((out / "prune_plan.json").read_text())
    assert plan["merge"] == "centroid"
    before, after = _stored(fp8_qwen3), _stored(out)
    gate = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert after[gate] == before[gate] and after[gate + "_scale_inv"] == before[gate + "_scale_inv"]
    attention = "model.layers.1.self_attn.q_proj.weight"
    assert _stored_bytes(out, attention) == _stored_bytes(fp8_qwen3, attention)  # unchanged: copied
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert "re-quantised" in (out / "README.md").read_text()
    # a merged expert dequantises to the frequency-weighted mean of its members' dequantised weights (neurons
    # aligned to the representative's), up to FP8 error
    from moecompress.models.neuron_alignment import align_neurons, neuron_features

    reference = reference_state_dict(fp8_qwen3)
    merged = load_with_transformers(out).state_dict()
    layer = next(k for k, per in plan["merged"].items() if any(len(m) > 1 for m in per))
    slot = next(i for i, m in enumerate(plan["merged"][layer]) if len(m) > 1)
    members, weights = plan["merged"][layer][slot], plan["merge_weights"][layer][slot]
    representative = plan["keep"][layer][slot]
    gate_up = reference[f"model.layers.{layer}.mlp.experts.gate_up_proj"].double()  # (E, 2I, H)
    down = reference[f"model.layers.{layer}.mlp.experts.down_proj"].double()  # (E, H, I)
    width = down.shape[-1]

    def features(e: int) -> torch.Tensor:
        return neuron_features([gate_up[e, :width], gate_up[e, width:], down[e]], [0, 0, 1])

    expected = 0
    for e, w in zip(members, weights):
        perm = torch.arange(width) if e == representative else align_neurons(features(representative), features(e))
        expected = expected + w * torch.cat([gate_up[e, :width][perm], gate_up[e, width:][perm]])
    got = merged[f"model.layers.{layer}.mlp.experts.gate_up_proj"][slot].double()
    assert float((got - expected).abs().max()) <= 0.1 * float(expected.abs().max())
    model = load_with_transformers(out)
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS).logits).all()


def test_neuron_width_must_fill_whole_blocks(fp8_qwen3: Path, tmp_path: Path, cli) -> None:  # noqa: ANN001
    code, _, err = cli("prune", str(fp8_qwen3), "--method", "heapr", "--ratio", "0.4", "--allocation", "uniform",
                       "-o", str(tmp_path / "x"))
    assert code != 0
    (line,) = error_lines(err)
    assert "multiple of 16" in line and "--ratio 0.666667 or 0.333333" in line
    assert not (tmp_path / "x").exists()


def test_condense_writes_the_input_format(fp8_qwen3: Path, tmp_path: Path, run) -> None:  # noqa: ANN001
    out = tmp_path / "condensed"
    run("condense", str(fp8_qwen3), "--layers", "1", "--experts", "2", "--samples", "4", "--seq-len", "64",
         "-o", str(out))
    after = _stored(out)
    assert after["model.layers.1.mlp.gate_proj.weight"][0] == torch.float8_e4m3fn
    assert "model.layers.1.mlp.gate_proj.weight_scale_inv" in after
    model = load_with_transformers(out)
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS).logits).all()


@pytest.mark.parametrize("name", ["fp8_deepseek", "mxfp4_gptoss"])
def test_quantize_and_eval_from_the_dequantised_weights(name: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                        run) -> None:  # noqa: ANN001
    import moecompress

    folder = request.getfixturevalue(name)
    out = tmp_path / "q"
    run("quantize", str(folder), "--bits", "2.5", "--samples", "4", "--seq-len", "64", "-o", str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    model = moecompress.load(out)
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS).logits).all()
    text = run("eval", str(folder), "--seq-len", "64", "--windows", "2")
    assert "mean" in text


def test_moecompress_load_reads_fp8_in_the_asked_dtype(fp8_deepseek: Path) -> None:
    import moecompress

    model = moecompress.load(fp8_deepseek, dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS).logits).all()


def test_unknown_and_gptq_formats_are_refused_in_one_line(fp8_qwen3: Path, tmp_path: Path, cli) -> None:  # noqa: ANN001
    folder = tmp_path / "awq"
    shutil.copytree(fp8_qwen3, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = cli("inspect", str(folder))
    (line,) = error_lines(err)
    assert code != 0 and "quant_method 'awq'" in line and "FP8" in line
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = cli("prune", str(folder), "--method", "frequency", "--ratio", "0.5", "-o", str(tmp_path / "out"))
    (line,) = error_lines(err)
    assert code != 0 and "already quantised" in line


def test_missing_scale_is_a_clear_error(fp8_qwen3: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(fp8_qwen3, folder)
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(str(shard))
    del tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(MoecompressError, match="has no .*_scale_inv"):
        CheckpointReader(folder)


def test_partial_blocks_dequantise_where_transformers_cannot(fp8_deepseek_ragged: Path, tmp_path: Path,
                                                              run) -> None:  # noqa: ANN001
    from tests.formats.published import tiny_model

    original = tiny_model("deepseek_v3", ragged=True).state_dict()  # the bf16 weights the fixture quantised
    reader = CheckpointReader(fp8_deepseek_ragged, dtype="bfloat16")
    ragged = 0
    for index, layer in enumerate(reader.adapter.decoder_layers(reader.model)):
        with reader.loaded(layer):
            for key, value in reader.model.state_dict().items():
                if not key.startswith(f"model.layers.{index}.") or value.dim() < 2:
                    continue
                expected = original[key].float()
                ragged += any(size % 16 for size in value.shape[-2:])
                # FP8 e4m3 keeps 3 mantissa bits: within 1/16 of the largest magnitude it shares a block with
                assert (value.float() - expected).abs().max() <= expected.abs().max() / 16, key
    assert ragged > 0
    out = tmp_path / "pruned"
    run("prune", str(fp8_deepseek_ragged), "--method", "frequency", "--ratio", "0.5", "--samples", "4",
        "--seq-len", "64", "-o", str(out))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [16, 16]


def test_grouped_fp8_layer_equals_the_whole_layer(fp8_deepseek: Path) -> None:
    """A MoE layer served in expert groups dequantises each group's FP8 experts as it loads them."""
    from moecompress.engine.layers import LayerEngine

    ids = TOKENS.repeat(2, 1)
    hidden = []
    for size in (None, 2):
        reader = CheckpointReader(fp8_deepseek, dtype="float32")
        budget = None
        if size is not None:
            ref = reader.adapter.moe_layers(reader.model)[0]
            prefix = reader.module_path(ref.experts) + "."
            keys = reader.layer_keys(ref.index)
            dense = reader.keys_bytes([k for k in keys if not k.startswith(prefix)])
            budget = dense + size * int(1.5 * (reader.layer_bytes(ref.index) - dense) / ref.num_experts) + 1
        engine = LayerEngine.from_reader(reader, max_layer_bytes=budget)
        engine.prepare([("all", ids)])
        for index in range(len(engine.layers)):
            engine.run_layer(index)
        hidden.append(engine.batches[0].hidden)
    torch.testing.assert_close(hidden[1], hidden[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_calibrate_reads_each_format(name: str, request: pytest.FixtureRequest, tmp_path: Path,
                                     run) -> None:  # noqa: ANN001
    from moecompress.calibration.stats import RoutingStats

    folder = request.getfixturevalue(name)
    out = tmp_path / "stats"
    run("calibrate", str(folder), "--samples", "2", "--seq-len", "32", "-o", str(out))
    stats = RoutingStats.load(out)
    assert stats.header.tokens and all(torch.isfinite(t).all() for t in stats.tensors.values())


def test_new_memory_counts_only_what_loading_copies(fp8_deepseek, tmp_path) -> None:
    """Tensors stored in their compute dtype load as file-backed views (no new memory); dequantised or
    converted ones are new tensors. The calibration budget counts the embeddings with this."""
    from moecompress.engine.reader import CheckpointReader
    from tests.cli_helpers import make_checkpoint

    reader = CheckpointReader(fp8_deepseek, dtype="auto")  # FP8 blocks dequantise to bf16; the embedding is bf16
    outside = reader.outside_layers(include_head=False)
    assert reader.new_memory_bytes(outside) < reader.keys_bytes(outside)  # the bf16 embedding is mapped, not copied
    embedding = [key for key in outside if "embed_tokens" in key]
    assert embedding and reader.new_memory_bytes(embedding) == 0
    quantized = [key for key in reader.layer_keys(0) if key.endswith("q_a_proj.weight")]
    assert quantized and reader.new_memory_bytes(quantized) == reader.keys_bytes(quantized)  # dequantised: new

    plain = make_checkpoint(tmp_path / "plain", "qwen3_moe")
    stored = {entry.dtype for entry in CheckpointReader(plain, dtype="auto").files.entries.values()}
    assert len(stored) == 1
    other = "bfloat16" if stored == {torch.float32} else "float32"
    mapped, converted = CheckpointReader(plain, dtype="auto"), CheckpointReader(plain, dtype=other)
    keys = mapped.outside_layers(include_head=False)
    assert mapped.new_memory_bytes(keys) == 0  # in its stored dtype: views of the files
    assert converted.new_memory_bytes(keys) == converted.keys_bytes(keys) > 0  # converted: new memory
