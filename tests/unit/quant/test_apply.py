"""The layer-at-a-time quantisation loop on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from moecompress.models.adapters import get_adapter
from moecompress.models.load import load_model
from moecompress.quant.apply import QuantPass, quantize_model
from moecompress.quant.settings import PlanHeader, QuantSettings, make_plan
from moecompress.quant.targets import find_targets
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch


def plan_for(model: torch.nn.Module, bits: int, settings: QuantSettings, mixed: bool = False):  # noqa: ANN201
    adapter = get_adapter(model)
    targets = find_targets(model, adapter)
    widths = {}
    for index, ref in targets.moe.items():
        widths[index] = [(2, 3, 4, 8)[e % 4] if mixed else bits for e in range(ref.num_experts)]
    return make_plan(targets, adapter, widths, settings, PlanHeader("test", [2, 3, 4, 8], {"bits": bits}))


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
                                progress=False, options=QuantPass(min_tokens=1))
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

    quantize_model(model, adapter, plan, [("d", ids)], on_layer=on_layer, progress=False,
                   options=QuantPass(min_tokens=1))
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
    report = quantize_model(model, get_adapter(model), plan_for(model, 4, QuantSettings(group_size=16)), [("d", ids)],
                            progress=False, options=QuantPass(min_tokens=5))
    assert report.fallbacks  # 8 tokens x top-2 over 8 experts: some experts see < 5 tokens
    assert all(tokens < 5 for tokens in report.fallbacks.values())
    assert report.methods["rtn-fallback"] == 3 * len(report.fallbacks)


def test_rtn_only_plan_needs_no_data() -> None:
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    report = quantize_model(model, get_adapter(model), plan_for(model, 3, QuantSettings(method="rtn")), None,
                            progress=False)
    assert set(report.methods) == {"rtn"}


def test_model_read_layer_by_layer_quantises_like_the_in_memory_one(tmp_path) -> None:  # noqa: ANN001
    """Through a CheckpointReader (one layer in memory) GPTQ gives the in-memory model's weights exactly."""
    from moecompress.engine.reader import CheckpointReader

    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    model.save_pretrained(tmp_path)
    ids = token_batch(model.config.vocab_size, batch=2, length=16)
    results = {}
    for streaming in (False, True):
        reader = CheckpointReader(tmp_path, dtype="float32") if streaming else None
        loaded, adapter = (reader.model, reader.adapter) if streaming else load_model(tmp_path)
        got = {}

        def on_layer(index, result, _got=got, _model=loaded):  # noqa: ANN001, ANN202
            if index is not None:
                layer = adapter.decoder_layers(_model)[index]
                _got[index] = {k: v.detach().clone() for k, v in layer.state_dict().items()}
            else:
                _got["head"] = _model.get_output_embeddings().weight.detach().clone()

        quantize_model(loaded, adapter, plan_for(loaded, 3, QuantSettings(group_size=16)), [("d", ids)],
                       on_layer=on_layer, progress=False, options=QuantPass(min_tokens=1, reader=reader))
        results[streaming] = got
        if streaming:
            assert all(p.device.type == "meta" for p in loaded.parameters())
    assert results[False].keys() == results[True].keys()
    for index, state in results[False].items():
        if index == "head":
            assert torch.equal(state, results[True][index])
            continue
        for key, value in state.items():
            assert torch.equal(value, results[True][index][key]), key


def test_expert_passes_within_a_memory_limit_give_the_same_result() -> None:
    """Experts processed one per pass (tiny memory limit) are quantised exactly as in one pass."""
    model = tiny_model(TINY_CONFIGS["mixtral"](), seed=0)
    ids = token_batch(model.config.vocab_size, batch=2, length=16)
    states = []
    for memory in (2**30, 1):
        copy_ = copy.deepcopy(model)
        quantize_model(copy_, get_adapter(copy_), plan_for(copy_, 3, QuantSettings(group_size=16)), [("d", ids)],
                       progress=False, options=QuantPass(min_tokens=1, expert_memory=memory))
        states.append(copy_.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_batched_expert_solves_equal_solving_each_expert_alone() -> None:
    """`quantize_experts` (GPTQ batched across experts, gate and up fused) = `quantize_expert` per expert."""
    from moecompress.quant.gptq import GPTQ
    from moecompress.quant.solve import quantize_expert, quantize_experts
    from moecompress.quant.spec import QuantSpec

    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    adapter = get_adapter(model)
    ref = adapter.moe_layers(model)[0]
    experts = {e: adapter.expert_weights(ref, e) for e in range(ref.num_experts)}
    hidden, width = experts[0].up.shape[1], experts[0].up.shape[0]
    gen = torch.Generator().manual_seed(0)
    inputs, acts, specs = {}, {}, {}
    for e in experts:
        inputs[e], acts[e] = GPTQ(hidden), GPTQ(width)
        tokens = 3 if e == 1 else 40  # expert 1 is starved: RTN fall-back
        inputs[e].add_batch(torch.randn(tokens, hidden, generator=gen))
        acts[e].add_batch(torch.randn(tokens, width, generator=gen))
        specs[e] = QuantSpec(bits=(2, 3, 4)[e % 3], group_size=16, method="rtn" if e == 2 else "gptq")
    for memory in (2**30, 1):  # one batch per spec, or one expert per batch
        together = quantize_experts(experts, specs, inputs, acts, min_tokens=8, solve_memory=memory)
        for e, expert in experts.items():
            alone = quantize_expert(expert, specs[e], inputs[e], acts[e], min_tokens=8)
            assert together[e].keys() == alone.keys()
            for proj, solved in alone.items():
                assert together[e][proj].method == solved.method
                assert torch.equal(together[e][proj].weight.codes, solved.weight.codes), (e, proj)
                assert torch.equal(together[e][proj].weight.scales, solved.weight.scales), (e, proj)
    assert together[1]["up_proj"].method == "rtn-fallback" and together[2]["up_proj"].method == "rtn"


def test_attention_statistics_pass_stops_before_the_moe_block() -> None:
    """The stage-0 pass ends at the MoE block (which never runs) and gathers the same statistics."""
    from moecompress.engine.layers import LayerEngine
    from moecompress.quant.layer_pass import LinearHessians, run_cached

    model = tiny_model(TINY_CONFIGS["mixtral"](), seed=0)
    adapter = get_adapter(model)
    targets = find_targets(model, adapter)
    runner = LayerEngine(model, adapter)
    runner.prepare([("d", token_batch(model.config.vocab_size, batch=2, length=16))])
    block = targets.moe[0].block
    calls = []
    handle = block.register_forward_hook(lambda *args: calls.append(1))
    stats = []
    try:
        for stop_at in ((), (block,)):
            hessians = LinearHessians({t.name: t.module for t in targets.linears[0] if t.role == "attention"})
            with hessians.hooked():
                run_cached(runner, 0, stop_at=stop_at)
            stats.append(hessians.stats)
    finally:
        handle.remove()
    assert len(calls) == 1  # only the pass without a stop ran the MoE block
    for name, full in stats[0].items():
        assert torch.equal(full.hessian, stats[1][name].hessian) and full.tokens == stats[1][name].tokens
    assert not block._forward_pre_hooks  # the stop hooks are removed


def test_a_stop_before_attention_falls_back_to_the_full_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the early stop starves an attention map (a layer running its MLP first), the full pass is rerun."""
    import moecompress.quant.apply as apply

    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    ids = token_batch(model.config.vocab_size, batch=2, length=16)
    states = []
    for stop_first in (False, True):
        copy_ = copy.deepcopy(model)
        if stop_first:  # stop at the first attention projection itself: its statistics stay empty
            monkeypatch.setattr(apply, "_later_stages", lambda targets, index, moe: [
                next(t.module for t in targets.linears[index] if t.role == "attention")])
        quantize_model(copy_, get_adapter(copy_), plan_for(copy_, 3, QuantSettings(group_size=16)), [("d", ids)],
                       progress=False, options=QuantPass(min_tokens=1))
        states.append(copy_.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
