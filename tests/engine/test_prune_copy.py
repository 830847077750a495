"""Pruning by copying tensors equals pruning the whole model, on every architecture it handles.

For each tiny architecture: keep the same experts in every MoE layer, write once by copying
the kept tensors from the input shards (`write_pruned_by_copy`) and once through the whole
model (`write_pruned`), reopen both with plain `from_pretrained`, and compare every tensor
bit for bit and the logits; the copy must also give the original model's logits with the
other experts masked in its router.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.models.load import inspect_checkpoint
from moecompress.io.expert_copy import ExpertCopyUnsupported, supports_expert_copy
from moecompress.prune.materialize import write_pruned, write_pruned_by_copy
from moecompress.prune.plan import PrunePlan
from moecompress.prune.request import PruneRequest
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.adapters.test_contract import ATOL
from tests.helpers import contract_keep, tiny_model, token_batch

# architectures whose adapter drops experts with its own code: written through the model
OWN_DROP = {"dbrx", "inkling_text"}


def _plan(adapter, model) -> PrunePlan:
    refs = adapter.moe_layers(model)
    num = refs[0].num_experts
    kept = contract_keep(adapter, model.config, num)
    return PrunePlan(method="frequency", params={}, allocation="uniform", domain=None, num_experts=num,
                     top_k=adapter.top_k(model.config), new_top_k=None, keep={ref.index: kept for ref in refs},
                     protected={})


def _assert_same_checkpoint(copy: Path, whole: Path, vocab_size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """Both folders reopened with `from_pretrained` hold the same tensors bit for bit and give the same logits.

    Returns the copy's model and the token ids its logits were compared on.
    """
    copied = AutoModelForCausalLM.from_pretrained(copy).eval()
    reference = AutoModelForCausalLM.from_pretrained(whole).eval()
    a, b = copied.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    ids = token_batch(vocab_size, batch=2, length=12)
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, reference(ids).logits)
    return copied, ids


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_copy_equals_whole_model(model_type, tmp_path) -> None:
    model = tiny_model(TINY_CONFIGS[model_type]())
    source = tmp_path / "in"
    model.save_pretrained(source)
    info = inspect_checkpoint(source)
    adapter = info.adapter
    plan = _plan(adapter, model)
    if model_type in OWN_DROP:
        assert not supports_expert_copy(adapter)
        with pytest.raises(ExpertCopyUnsupported):
            write_pruned_by_copy(info, plan, tmp_path / "copy", {}, progress=False)
        assert not (tmp_path / "copy").exists()
        return
    write_pruned_by_copy(info, plan, tmp_path / "copy", {}, progress=False)
    reference, _ = AutoModelForCausalLM.from_pretrained(source).eval(), None
    write_pruned(reference, adapter, plan, None, tmp_path / "whole", {}, source)

    copied, ids = _assert_same_checkpoint(tmp_path / "copy", tmp_path / "whole", model.config.vocab_size)
    with torch.no_grad():
        got = copied(ids).logits
        original = AutoModelForCausalLM.from_pretrained(source).eval()
        with adapter.mask_experts(original, plan.keep):
            masked = original(ids).logits
    torch.testing.assert_close(got, masked, atol=ATOL, rtol=1e-4)
    manifest = json.loads((tmp_path / "copy" / "moecompress_manifest.json").read_text())
    assert manifest["written_by"] == "tensor copy" and manifest["loads_with"].startswith("transformers")


def test_prune_command_streams_and_copies(tmp_path) -> None:
    """`prune_checkpoint` with a statistics-only method calibrates layer by layer and writes by copying."""
    from pathlib import Path

    import moecompress
    from moecompress.prune.run import prune_checkpoint

    example = Path(moecompress.__file__).parent / "example" / "model"
    result = prune_checkpoint(example, tmp_path / "out", PruneRequest(method="frequency", ratio=0.5, samples=2,
                                                                      seq_len=32), progress=False)
    manifest = json.loads((tmp_path / "out" / "moecompress_manifest.json").read_text())
    assert manifest["written_by"] == "tensor copy"
    assert manifest["calibration"]["mode"] == "layerwise"
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(example)
    assert pruned.dtype == original.dtype  # written in the stored dtype
    assert sum(p.numel() for p in pruned.parameters()) == result.params_after
    ids = token_batch(original.config.vocab_size, batch=1, length=16)
    adapter = inspect_checkpoint(example).adapter
    with torch.no_grad(), adapter.mask_experts(original, result.plan.keep):
        masked = original(ids).logits
        got = pruned(ids).logits
    torch.testing.assert_close(got.float(), masked.float(), atol=0, rtol=0)


# architectures stored with one tensor per expert on disk: their uniform neuron plans must take the copy
PER_EXPERT_ON_DISK = {"beam", "cohere2_moe", "dots3_note_text", "flex_olmo", "flint", "kolibri1", "laguna", "lfm2_moe",
                      "mimo_v2_flash", "minimax", "minimax_m2", "mixtral", "nemotron_h", "olmoe", "phimoe", "qwen2_moe",
                      "qwen3_5_moe_text", "qwen3_moe", "qwen3_next"}


def _neuron_plan(adapter, model, seed: int = 0) -> PrunePlan:
    """Every expert keeps a seeded random half of its neurons (ascending ids), the same width everywhere."""
    refs = adapter.moe_layers(model)
    num = refs[0].num_experts
    width = adapter.expert_weights(refs[0], 0).intermediate_size
    gen = torch.Generator().manual_seed(seed)
    neurons = {ref.index: [torch.randperm(width, generator=gen)[: width // 2].sort().values for _ in range(num)]
               for ref in refs}
    plan = PrunePlan(method="heapr", params={}, granularity="neuron", allocation="uniform", domain=None,
                     num_experts=num, top_k=adapter.top_k(model.config), new_top_k=None,
                     keep={ref.index: list(range(num)) for ref in refs}, protected={}, intermediate_size=width)
    plan.set_neurons(neurons)
    return plan


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_neuron_copy_equals_whole_model(model_type, tmp_path) -> None:
    """A uniform neuron plan (HEAPr at one width) written by copying equals the whole-model write, bit for bit."""
    from moecompress.errors import MoecompressError

    model = tiny_model(TINY_CONFIGS[model_type]())
    source = tmp_path / "in"
    model.save_pretrained(source)
    info = inspect_checkpoint(source)
    adapter = info.adapter
    plan = _neuron_plan(adapter, model)
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    try:
        write_pruned(reference, adapter, plan, None, tmp_path / "whole", {}, source)
    except MoecompressError:  # no stock config for this width (shared experts sized by it, ...): the copy refuses too
        with pytest.raises((MoecompressError, ExpertCopyUnsupported)):
            write_pruned_by_copy(info, plan, tmp_path / "copy", {}, progress=False)
        return
    try:
        write_pruned_by_copy(info, plan, tmp_path / "copy", {}, progress=False)
    except ExpertCopyUnsupported:
        assert model_type not in PER_EXPERT_ON_DISK
        assert not (tmp_path / "copy").exists()
        return
    _assert_same_checkpoint(tmp_path / "copy", tmp_path / "whole", model.config.vocab_size)


def test_heapr_uniform_prune_streams_end_to_end(tmp_path) -> None:
    """`prune --method heapr --allocation uniform`: gradients calibrated layer by layer, neurons written by copying.

    (The bundled example's experts are as wide as its hidden size, which leaves a square expert matrix's neuron axis
    ambiguous on disk: it is written through the model, as the log says. Real models' widths differ.)
    """
    from moecompress.prune.run import prune_checkpoint
    from tests.cli_helpers import make_checkpoint

    example = make_checkpoint(tmp_path / "model", "qwen3_moe")
    request = PruneRequest(method="heapr", ratio=0.25, allocation="uniform", samples=2, seq_len=32)
    result = prune_checkpoint(example, tmp_path / "out", request, progress=False)
    manifest = json.loads((tmp_path / "out" / "moecompress_manifest.json").read_text())
    assert manifest["written_by"] == "tensor copy"
    assert manifest["calibration"]["mode"] == "layerwise"  # the backward pass streamed too
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(example)
    assert pruned.config.moe_intermediate_size == round(0.75 * original.config.moe_intermediate_size)
    assert sum(p.numel() for p in pruned.parameters()) == result.params_after
    adapter = inspect_checkpoint(example).adapter
    neurons = {layer: torch.stack(list(ids)) for layer, ids in result.plan.neurons.items()}
    expected = adapter.drop(original, keep_neurons=neurons)  # the in-memory neuron drop of the same plan
    ids = token_batch(original.config.vocab_size, batch=1, length=16)
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, expected(ids).logits)
