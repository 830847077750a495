"""The layer-at-a-time quantisation loop on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from moecompress.models.adapters import get_adapter
from moecompress.models.load import load_model
from moecompress.quant.apply import quantize_model
from moecompress.quant.settings import QuantSettings, make_plan
from moecompress.quant.targets import find_targets
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch


def plan_for(model: torch.nn.Module, bits: int, settings: QuantSettings, mixed: bool = False):  # noqa: ANN201
    adapter = get_adapter(model)
    targets = find_targets(model, adapter)
    widths = {}
    for index, ref in targets.moe.items():
        widths[index] = [(2, 3, 4, 8)[e % 4] if mixed else bits for e in range(ref.num_experts)]
    return make_plan(targets, adapter, widths, settings, "test", [2, 3, 4, 8], {"bits": bits})


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gptq_model_is_closer_to_the_original_than_rtn() -> None:
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    ids = token_batch(model.config.vocab_size, batch=4, length=32, seed=3)
    batches = [("d", ids[:2]), ("d", ids[2:])]
    reference = logits(model, ids)
    errors = {}
    for method in ("gptq", "rtn"):
        quantised = copy.deepcopy(model)
        settings = QuantSettings(group_size=16, method=method, attention=3, dense_mlp=3)
        report = quantize_model(quantised, get_adapter(quantised), plan_for(quantised, 2, settings), batches,
                                min_tokens=1, progress=False)
        assert report.methods.get(method, 0) > 0
        errors[method] = float(((logits(quantised, ids) - reference) ** 2).mean())
    assert errors["gptq"] < errors["rtn"]


def test_written_back_weights_are_the_dequantised_results() -> None:
    model = tiny_model(TINY_CONFIGS["gpt_oss"](), seed=0)  # fused, transposed, interleaved experts with biases
    adapter = get_adapter(model)
    ids = token_batch(model.config.vocab_size, batch=2, length=16)
    plan = plan_for(model, 4, QuantSettings(group_size=32), mixed=True)
    seen = {}

    def on_layer(index, result):  # noqa: ANN001, ANN202
        seen[index] = result

    quantize_model(model, adapter, plan, [("d", ids)], on_layer=on_layer, min_tokens=1, progress=False)
    ref = adapter.moe_layers(model)[1]
    result = seen[ref.index]
    for e in range(ref.num_experts):
        canonical = adapter.expert_weights(ref, e)
        solved = result.experts[f"{ref.experts_path}.{e}"]
        assert solved["up_proj"].weight.bits == (2, 3, 4, 8)[e % 4]
        assert torch.equal(canonical.gate, solved["gate_proj"].weight.dequantize())
        assert torch.equal(canonical.down, solved["down_proj"].weight.dequantize())
        assert torch.equal(canonical.up_bias, canonical.up_bias.half().float())  # biases rounded to fp16
    for name, solved in result.linears.items():
        assert torch.equal(model.get_submodule(name).weight, solved.weight.dequantize())
    assert None in seen  # the head callback runs even when the head stays unquantised


def test_starved_experts_fall_back_to_rtn_and_are_listed() -> None:
    model = tiny_model(TINY_CONFIGS["mixtral"](), seed=0)
    ids = token_batch(model.config.vocab_size, batch=1, length=8)
    report = quantize_model(model, get_adapter(model), plan_for(model, 4, QuantSettings(group_size=16)),
                            [("d", ids)], min_tokens=5, progress=False)
    assert report.fallbacks  # 8 tokens x top-2 over 8 experts: some experts see < 5 tokens
    assert all(tokens < 5 for tokens in report.fallbacks.values())
    assert report.methods["rtn-fallback"] == 3 * len(report.fallbacks)


def test_rtn_only_plan_needs_no_data() -> None:
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    report = quantize_model(model, get_adapter(model), plan_for(model, 3, QuantSettings(method="rtn")), None,
                            progress=False)
    assert set(report.methods) == {"rtn"}


@pytest.mark.slow
def test_streamed_model_quantises_like_the_in_memory_one(tmp_path) -> None:  # noqa: ANN001
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    model.save_pretrained(tmp_path)
    ids = token_batch(model.config.vocab_size, batch=2, length=16)
    results = {}
    for streaming in (False, True):
        loaded, adapter = load_model(tmp_path, streaming=streaming)
        got = {}

        def on_layer(index, result, _got=got, _model=loaded):  # noqa: ANN001, ANN202
            if index is not None:
                layer = adapter.decoder_layers(_model)[index]
                _got[index] = {k: v.detach().clone() for k, v in layer.state_dict().items()}

        quantize_model(loaded, adapter, plan_for(loaded, 3, QuantSettings(group_size=16)), [("d", ids)],
                       on_layer=on_layer, min_tokens=1, progress=False)
        results[streaming] = got
    for index, state in results[False].items():
        for key, value in state.items():
            assert torch.allclose(value, results[True][index][key], atol=1e-6), key


def test_expert_passes_within_a_memory_limit_give_the_same_result() -> None:
    """Experts processed one per pass (tiny memory limit) are quantised exactly as in one pass."""
    model = tiny_model(TINY_CONFIGS["mixtral"](), seed=0)
    ids = token_batch(model.config.vocab_size, batch=2, length=16)
    states = []
    for memory in (2**30, 1):
        copy_ = copy.deepcopy(model)
        quantize_model(copy_, get_adapter(copy_), plan_for(copy_, 3, QuantSettings(group_size=16)), [("d", ids)],
                       min_tokens=1, progress=False, expert_memory=memory)
        states.append(copy_.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
