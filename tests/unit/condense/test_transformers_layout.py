"""Condensed layers written as stock dense layers reload with plain transformers and give the same logits.

Run in float64 (eager experts) so the comparison can be tight: the written dense layer holds
the condensed experts' neurons, the shared experts' neurons and zero padding in one MLP.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.condense.apply import condense_model
from moecompress.condense.transformers_layout import (
    DENSE_SLOTS,
    DenseSlots,
    NotExpressible,
    dense_layout_problem,
    to_transformers_model,
)
from moecompress.models.adapters import get_adapter
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch

EXPERTS = [5, 1, 6]
WEIGHTS = [0.35, 0.8, 1.3]
TOL = 1e-9


def _model(name: str):
    model = tiny_model(TINY_CONFIGS[name](), seed=0).to(torch.float64)
    model.set_experts_implementation("eager")
    return model, get_adapter(model)


def _condensed_layers(name: str, adapter, model) -> list[int]:
    moe = [ref.index for ref in adapter.moe_layers(model)]
    if DENSE_SLOTS[name].kind == "prefix":
        return moe[:1]
    return moe[-1:]


@pytest.mark.parametrize("name", sorted(set(DENSE_SLOTS) & set(TINY_CONFIGS)))
def test_dense_checkpoint_reloads_with_transformers(name: str, tmp_path) -> None:
    model, adapter = _model(name)
    layers = _condensed_layers(name, adapter, model)
    condense_model(model, adapter, {i: (EXPERTS, WEIGHTS) for i in layers})
    ids = token_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = model(ids).logits
    dense, info = to_transformers_model(model, adapter, layers)
    assert set(layers) <= set(info["dense_layers"])
    assert {ref.index for ref in adapter.moe_layers(dense)}.isdisjoint(layers)
    dense.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    reloaded.set_experts_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=TOL, rtol=TOL)


def test_gated_shared_expert_is_refused(monkeypatch) -> None:
    """Qwen2-MoE gates its shared expert per token: no dense MLP equals the condensed block.

    It is refused by the table, and, were it listed, by the numerical check of the written layer.
    """
    model, adapter = _model("qwen2_moe")
    layer = adapter.moe_layers(model)[-1].index
    condense_model(model, adapter, {layer: (EXPERTS, WEIGHTS)})
    assert "gate" in dense_layout_problem(model, adapter, [layer])
    with pytest.raises(NotExpressible, match="gate"):
        to_transformers_model(model, adapter, [layer])
    monkeypatch.setitem(DENSE_SLOTS, "qwen2_moe", DenseSlots("list", "mlp_only_layers"))
    with pytest.raises(NotExpressible, match="cannot reproduce"):
        to_transformers_model(model, adapter, [layer])


def test_prefix_configs_refuse_non_prefix_layers() -> None:
    model, adapter = _model("deepseek_v3")
    moe = [ref.index for ref in adapter.moe_layers(model)]
    problem = dense_layout_problem(model, adapter, [moe[-1]])
    assert problem is not None and "first_k_dense_replace" in problem
    assert dense_layout_problem(model, adapter, [moe[0]]) is None


def test_existing_dense_layers_are_padded_exactly(tmp_path) -> None:
    """Qwen3-MoE tiny: dense layer 0 (width 96); a condensed layer of 3 x 32 = 96, then of 5 x 32 = 160."""
    model, adapter = _model("qwen3_moe")
    layer = adapter.moe_layers(model)[-1].index
    experts = [0, 2, 3, 5, 7]
    condense_model(model, adapter, {layer: (experts, [0.5] * len(experts))})
    ids = token_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = model(ids).logits
    dense, info = to_transformers_model(model, adapter, [layer])
    assert info["width"] == 160 and info["padded_neurons"] == 160 - 96
    assert dense.config.intermediate_size == 160 and layer in dense.config.mlp_only_layers
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, expected, atol=TOL, rtol=TOL)
