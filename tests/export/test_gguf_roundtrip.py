"""A written GGUF read back with gguf.GGUFReader holds every checkpoint weight and the right metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from moecompress.export.gguf import export_gguf  # noqa: E402
from tests.export.expected import expected_tensors  # noqa: E402

Q = gguf.GGMLQuantizationType


def _hf(folder: Path) -> tuple[dict[str, torch.Tensor], Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.state_dict(), model.config


def _field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def _check_values(name: str, got: np.ndarray, want: np.ndarray, qtype: Any) -> None:
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    if qtype == Q.F32:
        np.testing.assert_array_equal(got, want, err_msg=name)
    elif qtype == Q.F16:
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
    elif qtype == Q.BF16:
        rounded = torch.from_numpy(want).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(got, rounded, err_msg=name)
    elif qtype == Q.Q8_0:  # half a step of each 32-value block's scale d = max |w| / 127, which is stored in
        # f16: q * d is then off by up to 127 * d * 2**-11 more
        step = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127
        err = np.abs(got - want).reshape(-1, 32)
        assert (err <= step * (0.5 + 127 * 2.0**-11) + 1e-7).all(), f"{name}: off by more than half a Q8_0 step"
    else:
        raise AssertionError(f"{name}: unexpected type {qtype}")


def _export_and_compare(folder: Path, tmp_path: Path, kind: str) -> tuple[Any, Any]:
    out = tmp_path / "model.gguf"
    result = export_gguf(folder, out, output_type=kind, progress=False)
    reader = gguf.GGUFReader(out)
    state, config = _hf(folder)
    want = expected_tensors(state, config)
    got = {t.name: t for t in reader.tensors}
    assert sorted(got) == sorted(want)
    assert result.tensors == len(want)
    for name, tensor in got.items():
        qtype = tensor.tensor_type
        shape = want[name].shape
        if len(shape) == 1 or name.split(".")[-2] in ("ffn_gate_inp", "exp_probs_b"):
            assert qtype == Q.F32, name
        elif shape[-1] % gguf.GGML_QUANT_SIZES[Q[kind.upper()]][0]:
            assert qtype == Q.F16, name  # rows that are not whole Q8_0 blocks fall back to f16
        else:
            assert qtype.name.lower() == kind, name
        values = gguf.quants.dequantize(tensor.data, qtype).reshape(shape)
        _check_values(name, values, want[name], qtype)
    return reader, config


def _check_metadata(reader: Any, config: Any, folder: Path, arch: str, experts: int, kind: str) -> None:
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.block_count") == config.num_hidden_layers
    assert _field(reader, f"{arch}.context_length") == config.max_position_embeddings
    assert _field(reader, f"{arch}.embedding_length") == config.hidden_size
    assert _field(reader, f"{arch}.attention.head_count") == config.num_attention_heads
    assert _field(reader, f"{arch}.expert_count") == experts
    assert _field(reader, f"{arch}.expert_used_count") == config.num_experts_per_tok
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert _field(reader, f"{arch}.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    spec = json.loads((folder / "tokenizer.json").read_text())
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    assert len(tokens) == config.vocab_size
    assert all(tokens[i] == text for text, i in vocab.items())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert _field(reader, "tokenizer.ggml.merges") == merges
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    types = _field(reader, "tokenizer.ggml.token_type")
    for entry in spec["added_tokens"]:
        assert types[entry["id"]] == (gguf.TokenType.CONTROL if entry["special"] else gguf.TokenType.USER_DEFINED)
    manifest = json.loads(_field(reader, "moecompress.manifest"))
    assert (manifest["operation"], manifest["method"], manifest["params"]) == ("export", "gguf", {"type": kind})
    assert manifest["source"]["path"] == str(folder)
    assert manifest["versions"]["moecompress"] and manifest["gguf"]["gguf_package"] == gguf_version()


def gguf_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("gguf")


@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0"])
def test_example_round_trip(example_dir: Path, tmp_path: Path, kind: str) -> None:
    reader, config = _export_and_compare(example_dir, tmp_path, kind)
    _check_metadata(reader, config, example_dir, "qwen3moe", 8, kind)
    assert _field(reader, "qwen3moe.expert_feed_forward_length") == config.moe_intermediate_size
    assert _field(reader, "qwen3moe.attention.head_count_kv") == config.num_key_value_heads
    assert _field(reader, "qwen3moe.attention.key_length") == config.head_dim
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 0
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd


def test_uniformly_pruned_example_round_trip(pruned_example: Path, tmp_path: Path) -> None:
    reader, config = _export_and_compare(pruned_example, tmp_path, "f16")
    _check_metadata(reader, config, pruned_example, "qwen3moe", 4, "f16")
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # ggml order (innermost first)
    assert shapes["blk.0.ffn_gate_exps.weight"] == (128, 128, 4)
    assert shapes["blk.0.ffn_down_exps.weight"] == (128, 128, 4)
    assert shapes["blk.0.ffn_gate_inp.weight"] == (128, 4)


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_deepseek_v3_round_trip(tiny_dir: Any, tmp_path: Path, kind: str) -> None:
    folder = tiny_dir("deepseek_v3")
    reader, config = _export_and_compare(folder, tmp_path, kind)
    _check_metadata(reader, config, folder, "deepseek2", 8, kind)
    assert _field(reader, "deepseek2.attention.kv_lora_rank") == config.kv_lora_rank
    assert _field(reader, "deepseek2.attention.q_lora_rank") == config.q_lora_rank
    assert _field(reader, "deepseek2.attention.head_count_kv") == 1
    assert _field(reader, "deepseek2.attention.key_length") == config.kv_lora_rank + config.qk_rope_head_dim
    assert _field(reader, "deepseek2.attention.key_length_mla") == config.qk_nope_head_dim + config.qk_rope_head_dim
    assert _field(reader, "deepseek2.attention.value_length_mla") == config.v_head_dim
    assert _field(reader, "deepseek2.rope.dimension_count") == config.qk_rope_head_dim
    assert _field(reader, "deepseek2.leading_dense_block_count") == config.first_k_dense_replace
    assert _field(reader, "deepseek2.expert_shared_count") == config.n_shared_experts
    assert _field(reader, "deepseek2.expert_weights_scale") == pytest.approx(config.routed_scaling_factor)
    assert _field(reader, "deepseek2.expert_weights_norm") is True
    assert _field(reader, "deepseek2.expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID
    assert _field(reader, "deepseek2.expert_group_count") == config.n_group
    assert _field(reader, "deepseek2.expert_group_used_count") == config.topk_group


def test_mixtral_round_trip(tiny_dir: Any, tmp_path: Path) -> None:
    folder = tiny_dir("mixtral")
    reader, config = _export_and_compare(folder, tmp_path, "f32")
    _check_metadata(reader, config, folder, "llama", 8, "f32")
    assert _field(reader, "llama.rope.dimension_count") == config.head_dim


def test_deepseek_v3_variants_round_trip(deepseek_no_q_lora: Path, pruned_deepseek: Path, tmp_path: Path) -> None:
    reader, config = _export_and_compare(deepseek_no_q_lora, tmp_path / "no_q_lora", "f32")
    assert _field(reader, "deepseek2.attention.q_lora_rank") == 0  # no low-rank query path: attn_q
    reader, config = _export_and_compare(pruned_deepseek, tmp_path / "pruned", "bf16")
    _check_metadata(reader, config, pruned_deepseek, "deepseek2", 4, "bf16")
    assert _field(reader, "deepseek2.expert_group_count") == 2


@pytest.mark.parametrize("model_type,arch", [("qwen3_moe", "qwen3moe"), ("deepseek_v3", "deepseek2")])
def test_yarn_rope_keys(yarn_dir: Any, tmp_path: Path, model_type: str, arch: str) -> None:
    folder = yarn_dir(model_type)
    reader, config = _export_and_compare(folder, tmp_path, "f32")
    assert _field(reader, f"{arch}.rope.scaling.type") == "yarn"
    assert _field(reader, f"{arch}.rope.scaling.factor") == pytest.approx(4.0)
    assert _field(reader, f"{arch}.rope.scaling.original_context_length") == 64
    if arch == "deepseek2":  # 0.1 * mscale_all_dim
        assert _field(reader, "deepseek2.rope.scaling.yarn_log_multiplier") == pytest.approx(0.1)


def test_condensed_deepseek_round_trip(condensed_deepseek: Path, tmp_path: Path) -> None:
    reader, config = _export_and_compare(condensed_deepseek, tmp_path, "f32")
    assert config.first_k_dense_replace == 2  # the condensed layer became the second leading dense layer
    assert _field(reader, "deepseek2.leading_dense_block_count") == 2
    assert _field(reader, "deepseek2.feed_forward_length") == config.intermediate_size
