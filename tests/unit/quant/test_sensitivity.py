"""Sensitivity costs equal direct measurements: quantise one expert, re-run the block, compare."""

from __future__ import annotations

import copy

import pytest
import torch

from moecompress.models.adapters import get_adapter
from moecompress.quant.rtn import quantize_rtn
from moecompress.engine.reader import CheckpointReader
from moecompress.quant.sensitivity import (
    CandidateSettings,
    LayerErrors,
    block_errors,
    fisher_errors,
    whole_model_fisher_errors,
)
from moecompress.quant.solve import Solved, write_expert
from moecompress.quant.spec import QuantSpec
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch

BASE = QuantSpec(bits=4, group_size=16)


def block_io(model: torch.nn.Module, block: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE block's input and output in a normal forward."""
    seen = {}

    def hook(module, args, output):  # noqa: ANN001, ANN202
        seen["x"] = args[0].detach().clone()
        seen["y"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handle = block.register_forward_hook(hook)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen["x"], seen["y"]


def quantise_one_expert(model: torch.nn.Module, layer_index: int, expert: int, bits: int) -> torch.nn.Module:
    """A copy of `model` where only `expert` of MoE layer `layer_index` is RTN-quantised."""
    copy_ = copy.deepcopy(model)
    adapter = get_adapter(copy_)
    ref = next(r for r in adapter.moe_layers(copy_) if r.index == layer_index)
    canonical = adapter.expert_weights(ref, expert)
    spec = BASE.model_copy(update={"bits": bits, "method": "rtn"})
    solved = {"gate_proj": Solved(quantize_rtn(canonical.gate, spec), "rtn"),
              "up_proj": Solved(quantize_rtn(canonical.up, spec), "rtn"),
              "down_proj": Solved(quantize_rtn(canonical.down, spec), "rtn")}
    write_expert(canonical, solved)
    return copy_


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_block_errors_equal_measured_block_output_error(arch: str) -> None:
    model = tiny_model(TINY_CONFIGS[arch](), seed=0)
    adapter = get_adapter(model)
    ids = token_batch(model.config.vocab_size, batch=2, length=16)
    sens = block_errors(copy.deepcopy(model), adapter, [("d", ids)], CandidateSettings([2, 4], BASE), progress=False)
    ref = adapter.moe_layers(model)[0]
    errors = sens.layers[ref.index]
    assert int(errors.count.sum()) == ids.numel() * ref.top_k
    x, y = block_io(model, ref.block, ids)
    for expert in (0, 3):
        for c, bits in enumerate([2, 4]):
            changed = quantise_one_expert(model, ref.index, expert, bits)
            block = next(r for r in get_adapter(changed).moe_layers(changed) if r.index == ref.index).block
            with torch.no_grad():
                out = block(x)
            y_hat = out[0] if isinstance(out, tuple) else out
            measured = float(((y - y_hat).double() ** 2).sum())
            assert errors.error[expert, c] == pytest.approx(measured, rel=1e-3, abs=1e-9)
    assert torch.all(errors.error[:, 0] >= errors.error[:, 1])  # 2 bits hurt more than 4
    costs = sens.mc_moe_costs()[ref.index]
    assert costs.shape == (ref.num_experts, 2)


def test_fisher_errors_weight_the_error_by_squared_gradients() -> None:
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    adapter = get_adapter(model)
    ids = token_batch(model.config.vocab_size, batch=1, length=12)
    sens = fisher_errors(model, adapter, [("d", ids)], CandidateSettings([2], BASE), progress=False)
    ref = adapter.moe_layers(model)[0]
    # direct: gradient of the loss at the block output, then the error of quantising expert 2
    grads = {}

    def hook(module, args, output):  # noqa: ANN001, ANN202
        out = output[0] if isinstance(output, tuple) else output
        out.register_hook(lambda g: grads.setdefault("g", g.detach().clone()))

    handle = ref.block.register_forward_hook(hook)
    emb = model.get_input_embeddings()
    h2 = emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    model(input_ids=ids, labels=ids).loss.backward()
    handle.remove()
    h2.remove()
    model.zero_grad()
    x, y = block_io(model, ref.block, ids)
    changed = quantise_one_expert(model, ref.index, 2, 2)
    block = next(r for r in get_adapter(changed).moe_layers(changed) if r.index == ref.index).block
    with torch.no_grad():
        out = block(x)
    y_hat = out[0] if isinstance(out, tuple) else out
    measured = float((grads["g"].double() ** 2 * (y - y_hat).double() ** 2).sum())
    assert sens.layers[ref.index].error[2, 0] == pytest.approx(measured, rel=1e-3)


def test_block_errors_in_several_passes_are_unchanged() -> None:
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    adapter = get_adapter(model)
    ids = token_batch(model.config.vocab_size, batch=2, length=16)
    one = block_errors(copy.deepcopy(model), adapter, [("d", ids)], CandidateSettings([2, 3], BASE, quantizer="gptq"),
                       progress=False)
    many = block_errors(copy.deepcopy(model), adapter, [("d", ids)],
                        CandidateSettings([2, 3], BASE, quantizer="gptq", expert_memory=1), progress=False)
    for layer, errors in one.layers.items():
        torch.testing.assert_close(errors.error, many.layers[layer].error, rtol=1e-6, atol=1e-12)
        assert torch.equal(errors.count, many.layers[layer].count)


@pytest.mark.parametrize("arch,quantizer", [("qwen3_moe", "rtn"), ("deepseek_v3", "rtn"), ("mixtral", "gptq"),
                                            ("gpt_oss", "rtn"), ("qwen3_moe", "gptq")])
def test_layer_streamed_fisher_errors_equal_the_whole_model_backward(arch: str, quantizer: str, tmp_path) -> None:
    """GEMQ from a checkpoint read one layer at a time (backward streamed) = one whole-model backward per batch."""
    model = tiny_model(TINY_CONFIGS[arch](), seed=0).float()
    model.save_pretrained(tmp_path)
    adapter = get_adapter(model)
    ids = token_batch(model.config.vocab_size, batch=4, length=12)
    batches = [("a", ids[:2]), ("b", ids[2:])]
    settings = CandidateSettings([2, 4], BASE, quantizer=quantizer, min_tokens=2)
    expected = {ref.index: LayerErrors.zeros(ref.num_experts, [2, 4]) for ref in adapter.moe_layers(model)}
    whole_model_fisher_errors(model, adapter, batches, expected, settings, progress=False)
    reader = CheckpointReader(tmp_path, dtype="float32")
    streamed = fisher_errors(reader.model, reader.adapter, batches, settings, progress=False, reader=reader)
    assert streamed.kind == "fisher" and sorted(streamed.layers) == sorted(expected)
    for index, errors in expected.items():
        got = streamed.layers[index]
        assert float(errors.error.sum()) > 0
        torch.testing.assert_close(got.error, errors.error, rtol=1e-4, atol=1e-12, msg=f"layer {index}")
        torch.testing.assert_close(got.drop_error, errors.drop_error, rtol=1e-4, atol=1e-12)
        assert torch.equal(got.count, errors.count)
    assert all(p.device.type == "meta" for p in reader.model.parameters())


def test_fisher_errors_with_gptq_candidates_weight_the_gptq_error_by_squared_gradients() -> None:
    """GEMQ with --sensitivity-quantizer gptq: the Fisher-weighted error of each expert's GPTQ solve on its tokens."""
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    adapter = get_adapter(model)
    ids = token_batch(model.config.vocab_size, batch=2, length=16)
    gptq = fisher_errors(model, adapter, [("d", ids)], CandidateSettings([2], BASE, quantizer="gptq"), progress=False)
    rtn = fisher_errors(model, adapter, [("d", ids)], CandidateSettings([2], BASE), progress=False)
    for index, errors in gptq.layers.items():
        routed = errors.count > 16  # experts with enough tokens for a well-posed GPTQ solve
        assert routed.any()
        assert torch.equal(errors.count, rtn.layers[index].count)
        torch.testing.assert_close(errors.drop_error, rtn.layers[index].drop_error)  # the same gradients
        # GPTQ minimises the error on the expert's own tokens: below round-to-nearest's for most experts
        better = (errors.error[routed, 0] < rtn.layers[index].error[routed, 0]).float().mean()
        assert float(better) >= 0.75, index
