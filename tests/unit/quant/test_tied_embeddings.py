"""Quantised checkpoints of models whose output head is tied to the input embedding.

Regression: `quantize_model` called the writers' end-of-model callback (embeddings, final
norm, head) only when the model had an untied head, so tied models were written without
their embeddings and final norm and could not be reopened.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moecompress.quant.fake_quant import FakeQuantWriter
from moecompress.quant.gptq_writer import GPTQWriter
from moecompress.models.adapters import get_adapter
from moecompress.quant.apply import quantize_model
from moecompress.quant.load import load_quantized
from moecompress.quant.settings import PlanHeader, QuantSettings, make_plan
from moecompress.quant.targets import find_targets
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch


def test_tied_head_checkpoints_keep_embeddings_and_final_norm(tmp_path: Path) -> None:
    config = TINY_CONFIGS["qwen3_moe"]()
    config.tie_word_embeddings = True
    config.mlp_only_layers = []
    model = tiny_model(config, seed=0)
    adapter = get_adapter(model)
    targets = find_targets(model, adapter)
    assert targets.head is None  # tied: no separate head to quantise
    widths = {index: [3] * ref.num_experts for index, ref in targets.moe.items()}
    plan = make_plan(targets, adapter, widths, QuantSettings(group_size=16, method="rtn"),
                     PlanHeader("test", [3], {"bits": 3}))
    writers = [GPTQWriter(tmp_path / "gptq", model, adapter, plan, torch.float32),
               FakeQuantWriter(tmp_path / "fake", model, adapter, torch.float32)]
    for kind in ("gptq", "fake"):
        (tmp_path / kind).mkdir()

    def on_layer(index, result):  # noqa: ANN001, ANN202
        for writer in writers:
            writer.on_layer(index, result)

    quantize_model(model, adapter, plan, None, on_layer=on_layer, progress=False)
    for writer in writers:
        writer.finish()

    ids = token_batch(config.vocab_size, batch=1, length=12, seed=2)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded, _ = load_quantized(tmp_path / "gptq")
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "fake", dtype=torch.float32,
                                                           output_loading_info=True)
        assert not info["missing_keys"]
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
