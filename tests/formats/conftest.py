"""Session-scoped tiny checkpoints in published quantised formats (see ``tests/formats/published.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.formats.published import write_fp8_checkpoint, write_mxfp4_checkpoint


@pytest.fixture(scope="session")
def fp8_deepseek(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V3 (MLA, layer 0 dense, shared + 8 routed experts), FP8 e4m3 with [16, 16] blocks."""
    return write_fp8_checkpoint(tmp_path_factory.mktemp("fp8_deepseek"), "deepseek_v3")


@pytest.fixture(scope="session")
def fp8_deepseek_ragged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As ``fp8_deepseek`` but with partial edge blocks (40-row kv_a_proj_with_mqa, intermediate 40).

    transformers 5.23 cannot dequantise it on the CPU; compare against ``tiny_model("deepseek_v3", ragged=True)``.
    """
    return write_fp8_checkpoint(tmp_path_factory.mktemp("fp8_deepseek_ragged"), "deepseek_v3", ragged=True)


@pytest.fixture(scope="session")
def fp8_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3-MoE (8 experts, top-2), FP8 e4m3 with [16, 16] blocks, Qwen3-*-FP8 style config."""
    return write_fp8_checkpoint(tmp_path_factory.mktemp("fp8_qwen3"), "qwen3_moe")


@pytest.fixture(scope="session")
def mxfp4_gptoss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt-oss (4 experts, top-2) with MXFP4 routed experts, as openai/gpt-oss-* are published."""
    return write_mxfp4_checkpoint(tmp_path_factory.mktemp("mxfp4_gptoss"))
