"""Size accounting by role: counts from the adapter's module ownership, on real and meta models."""

from __future__ import annotations

import pytest
import torch

from moecompress.models.adapters import get_adapter
from moecompress.models.load import inspect_checkpoint
from moecompress.sizes import ROLES, format_bytes, format_count, size_report, skeleton_model, tensor_roles
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model


def _numel(modules) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


@pytest.fixture(scope="module")
def qwen3():
    config = TINY_CONFIGS["qwen3_moe"]()
    return config, tiny_model(config, seed=0)


def test_qwen3_moe_roles(qwen3) -> None:
    config, model = qwen3
    adapter = get_adapter(model)
    report = size_report(model, adapter)
    roles = report.roles
    moe = adapter.moe_layers(model)
    hidden, width, experts = config.hidden_size, config.moe_intermediate_size, config.num_experts
    assert len(moe) == config.num_hidden_layers - len(config.mlp_only_layers)
    assert roles["routed_experts"].params == experts * 3 * hidden * width * len(moe)
    assert roles["routers"].params == experts * hidden * len(moe)
    assert roles["dense_mlp"].params == 3 * hidden * config.intermediate_size * len(config.mlp_only_layers)
    assert roles["embeddings"].params == 2 * config.vocab_size * hidden  # untied embedding + head
    assert roles["shared_experts"].params == 0
    assert roles["attention"].params == _numel(layer.self_attn for layer in model.model.layers)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert sum(r.params for r in roles.values()) == report.total_params
    assert report.total_bytes == 4 * report.total_params  # fp32
    assert set(report.to_dict()["roles"]) == set(ROLES)


def test_meta_skeleton_matches_real_model_and_uses_given_dtype(qwen3) -> None:
    config, model = qwen3
    skeleton = skeleton_model(config, torch.bfloat16)
    assert next(skeleton.parameters()).is_meta
    adapter = get_adapter(skeleton)
    meta = size_report(skeleton, adapter, dtype=torch.bfloat16)
    real = size_report(model, adapter)
    assert {k: v.params for k, v in meta.roles.items()} == {k: v.params for k, v in real.roles.items()}
    assert meta.total_bytes == 2 * meta.total_params
    assert meta.dtype == "bfloat16"


def test_tied_embeddings_counted_once() -> None:
    config = TINY_CONFIGS["qwen3_moe"]()
    config.tie_word_embeddings = True
    model = tiny_model(config)
    report = size_report(model)
    assert report.roles["embeddings"].params == config.vocab_size * config.hidden_size
    assert report.total_params == sum(p.numel() for p in model.parameters())


def test_shared_experts_dense_layer_and_router_buffers() -> None:
    if "deepseek_v3" not in TINY_CONFIGS:
        pytest.skip("no deepseek_v3 tiny config")
    model = tiny_model(TINY_CONFIGS["deepseek_v3"]())
    adapter = get_adapter(model)
    moe = adapter.moe_layers(model)
    report = size_report(model, adapter)
    roles = tensor_roles(model, adapter)
    assert report.roles["shared_experts"].params == _numel(m for ref in moe for m in ref.shared) > 0
    assert report.roles["dense_mlp"].params > 0  # first_k_dense_replace=1
    bias_names = [n for n, _ in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert bias_names and all(roles[n] == "routers" for n in bias_names)
    persistent_buffers = sum(model.get_buffer(n).numel() for n in bias_names)
    assert report.total_params == sum(p.numel() for p in model.parameters()) + persistent_buffers
    assert report.roles["routers"].params == sum(ref.router.weight.numel() for ref in moe) + persistent_buffers


def test_size_report_from_checkpoint_reads_dtype_from_headers(qwen3, tmp_path) -> None:
    config, model = qwen3
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    model.to(torch.float32)
    info = inspect_checkpoint(tmp_path)
    report = size_report(info)
    assert report.dtype == "bfloat16"
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.total_bytes == 2 * report.total_params


def test_formatting() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    assert format_count(999) == "999"
    assert format_count(1_234_567) == "1.23M"
