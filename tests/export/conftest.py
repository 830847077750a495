"""Checkpoints the GGUF export tests write: the embedded example, it pruned uniformly, tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import make_checkpoint

EXAMPLE = Path(__file__).resolve().parents[2] / "moecompress" / "example" / "model"


@pytest.fixture(scope="session")
def example_dir() -> Path:
    """The embedded Qwen3-MoE example (tied embeddings, custom byte-level BPE tokenizer)."""
    return EXAMPLE


@pytest.fixture(scope="session")
def pruned_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example with 4 of its 8 experts kept in every MoE layer (uniform), through the CLI."""
    from typer.testing import CliRunner

    from moecompress.cli.app import app

    out = tmp_path_factory.mktemp("pruned") / "model"
    done = CliRunner().invoke(app, ["prune", str(EXAMPLE), "--method", "frequency", "--keep", "4", "--samples", "4",
                                    "--seq-len", "64", "-o", str(out)])
    assert done.exit_code == 0, done.output
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """Build (once per model type) a tiny seeded checkpoint with a byte-level BPE tokenizer."""
    made: dict[str, Path] = {}

    def build(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = make_checkpoint(tmp_path_factory.mktemp(model_type) / "model", model_type)
        return made[model_type]

    return build


@pytest.fixture(scope="session")
def deepseek_no_q_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DeepSeek-V3 whose queries have no low-rank path (q_lora_rank None, as the fixture's)."""
    from tests.adapters.tiny_configs import TINY_CONFIGS
    from tests.helpers import tiny_model
    from tests.tiny_tokenizer import save_tokenizer

    folder = tmp_path_factory.mktemp("deepseek_no_q_lora") / "model"
    folder.mkdir(parents=True)
    tokenizer = save_tokenizer(folder, vocab_size=300)
    config = TINY_CONFIGS["deepseek_v3"]()
    config.q_lora_rank = None
    config.vocab_size = len(tokenizer)
    tiny_model(config, seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def pruned_deepseek(tiny_dir: Any) -> Path:
    """The tiny DeepSeek-V3 with 2 of the 4 experts of each of its 2 groups kept, every MoE layer alike."""
    from moecompress.models.load import load_model

    source = tiny_dir("deepseek_v3")
    model, adapter = load_model(source)
    keep = {ref.index: [0, 1, 4, 5] for ref in adapter.moe_layers(model)}
    out = source.parent.parent / "pruned_deepseek"
    adapter.drop(model, keep_experts=keep).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    return out


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="session")
def yarn_dir(tmp_path_factory: pytest.TempPathFactory):
    """Build a tiny all-MoE Qwen3-MoE or a DeepSeek-V3 with YaRN rope scaling (factor 4 over 64 positions)."""
    import transformers

    from tests.adapters.tiny_configs import TINY_CONFIGS
    from tests.helpers import tiny_model
    from tests.tiny_tokenizer import save_tokenizer

    def build(model_type: str) -> Path:
        folder = tmp_path_factory.mktemp(f"{model_type}_yarn") / "model"
        folder.mkdir(parents=True)
        tokenizer = save_tokenizer(folder, vocab_size=300)
        if model_type == "qwen3_moe":
            config = transformers.Qwen3MoeConfig(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                norm_topk_prob=True, rope_parameters=dict(YARN))
        else:
            config = TINY_CONFIGS[model_type]()
            config.rope_parameters = dict(YARN, mscale=1.0, mscale_all_dim=1.0)
        config.vocab_size = len(tokenizer)
        config.max_position_embeddings = 512
        tiny_model(config, seed=5).save_pretrained(folder)
        return folder

    return build


@pytest.fixture(scope="session")
def condensed_deepseek(tiny_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DeepSeek-V3 with its first MoE layer condensed into a leading dense layer (a stock folder)."""
    from typer.testing import CliRunner

    from moecompress.cli.app import app
    from tests.tiny_tokenizer import sample_text

    work = tmp_path_factory.mktemp("condensed")
    (work / "text.txt").write_text(sample_text())
    out = work / "model"
    done = CliRunner().invoke(app, ["condense", str(tiny_dir("deepseek_v3")), "--layers", "1", "--experts", "2",
                                    "--data", str(work / "text.txt"), "--samples", "4", "--seq-len", "32",
                                    "--no-timing", "-o", str(out)])
    assert done.exit_code == 0, done.output
    return out
