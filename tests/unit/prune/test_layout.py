"""Non-uniform layouts over every adapter: per-layer expert counts and per-expert widths.

1. dropping a different number of experts per layer equals masking them in the router;
2. per-expert neuron widths (zero-padded in memory) equal zeroing the dropped neurons;
3. the layout checkpoint re-opened with `moecompress.load` equals the in-memory model, and a
   stock loader refuses the folder instead of loading it wrongly.

Architectures that cannot hold such a layout are listed, with why, in tests/expected_skips.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.models.adapters import get_adapter
from moecompress.models.layout import (
    ExpertLayout,
    drop_to_layout,
    layout_config,
    pack_neurons,
    save_layout_checkpoint,
    unpack_neurons,
)
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.expected_skips import NONUNIFORM_LAYOUT, NONUNIFORM_LAYOUT_LAYERS, expect_condition, expect_refusal
from tests.helpers import tiny_model, token_batch

ATOL = 2e-5


def nonuniform_keep(adapter, config, layers) -> dict[int, list[int]]:
    """A different kept count in successive MoE layers (equal per group for grouped routers)."""
    groups = adapter.groups(config)
    gen = torch.Generator().manual_seed(11)
    keep = {}
    for position, ref in enumerate(layers):
        num = ref.num_experts
        if groups is None:
            counts = [max(ref.top_k, 3), max(ref.top_k, 5), num]
            count = counts[position % len(counts)]
            keep[ref.index] = sorted(torch.randperm(num, generator=gen)[:count].tolist())
        else:
            n_group = groups[0]
            size = num // n_group
            per_group = [max(2, size // 2), size][position % 2]
            keep[ref.index] = [g * size + j for g in range(n_group)
                               for j in sorted(torch.randperm(size, generator=gen)[:per_group].tolist())]
    return keep


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request):
    config = TINY_CONFIGS[request.param]()
    model = tiny_model(config, seed=0)
    return request.param, model, get_adapter(model)


def test_nonuniform_layout_equals_masked_and_reloads(arch, tmp_path) -> None:
    """Different expert counts per layer AND a different width per expert, against mask + zeroed neurons."""
    import moecompress

    name, model, adapter = arch
    layers = adapter.moe_layers(model)
    expect_condition(NONUNIFORM_LAYOUT_LAYERS, name, len(layers) < 2, "one MoE layer only")
    keep = nonuniform_keep(adapter, model.config, layers)
    width = adapter.expert_weights(layers[0], 0).intermediate_size
    gen = torch.Generator().manual_seed(5)
    neurons = {ref.index: {e: torch.randperm(width, generator=gen)[: int(torch.randint(1, width + 1, (1,), generator=gen))]
                           for e in keep[ref.index]} for ref in layers}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for ref in adapter.moe_layers(reference):
            for e in keep[ref.index]:
                dropped_neurons = torch.ones(width, dtype=torch.bool)
                dropped_neurons[neurons[ref.index][e]] = False
                adapter.expert_weights(ref, e).down[:, dropped_neurons] = 0
    ids = token_batch(model.config.vocab_size)
    with torch.no_grad(), adapter.mask_experts(reference, keep):
        expected = reference(ids).logits

    pruned = copy.deepcopy(model)
    keep_neurons = {layer: [neurons[layer][e] for e in kept] for layer, kept in keep.items()}
    with expect_refusal(NONUNIFORM_LAYOUT, name):  # listed: the architecture cannot hold per-layer layouts
        layout = drop_to_layout(pruned, adapter, keep_experts=keep, keep_neurons=keep_neurons)
    assert layout.experts == {layer: len(v) for layer, v in keep.items()}
    assert len(set(layout.experts.values())) > 1
    assert layout.widths == {layer: [len(n) for n in v] for layer, v in keep_neurons.items()}
    with torch.no_grad():
        got = pruned(ids).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)

    save_layout_checkpoint(pruned, adapter, layout, tmp_path, layout_config(model.config, adapter, layout))
    reloaded = moecompress.load(tmp_path, dtype=torch.float32)
    for ref in adapter.moe_layers(reloaded):
        assert ref.num_experts == layout.experts[ref.index]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, got, atol=ATOL, rtol=1e-4)


def test_pack_unpack_round_trip() -> None:
    widths = [3, 1, 4]
    for packing, axis, shape in (("concat", 1, (3, 8, 5)), ("interleave", 1, (3, 8, 5)), ("single", 2, (3, 5, 4)),
                                 ("concat", 2, (3, 5, 8))):
        factor = 1 if packing == "single" else 2
        full = torch.randn(shape)
        a = axis
        # zero the padded slots as the in-memory layout has them
        for e, w in enumerate(widths):
            if packing == "concat":
                half = shape[a] // 2
                full[e].narrow(a - 1, w, half - w).zero_()
                full[e].narrow(a - 1, half + w, half - w).zero_()
            else:
                full[e].narrow(a - 1, factor * w, shape[a] - factor * w).zero_()
        packed = pack_neurons(full, widths, axis, packing)
        assert packed.shape[a - 1] == factor * sum(widths)
        torch.testing.assert_close(unpack_neurons(packed, widths, 4, axis, packing), full, atol=0, rtol=0)


def test_stock_loader_refuses_a_layout_folder(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    layout = drop_to_layout(model, adapter, keep_experts={layers[0].index: [0, 1, 2], layers[1].index: [0, 1, 2, 3, 4]})
    save_layout_checkpoint(model, adapter, layout, tmp_path, layout_config(model.config, adapter, layout))
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_layout_rejects_bad_requests() -> None:
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[0]
    with pytest.raises(MoecompressError, match="top_k"):
        drop_to_layout(model, adapter, keep_experts={layer.index: [3]})
    with pytest.raises(MoecompressError, match="distinct"):
        drop_to_layout(model, adapter, keep_experts={layer.index: [3, 3]})
    with pytest.raises(Exception):
        ExpertLayout.model_validate({"experts": {1: 4}, "unknown": 1})


def test_tied_embeddings_round_trip(tmp_path) -> None:
    import moecompress

    config = TINY_CONFIGS["qwen3_moe"]()
    config.tie_word_embeddings = True
    model = tiny_model(config, seed=0)
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    layout = drop_to_layout(model, adapter, keep_experts={layers[0].index: [0, 1, 2], layers[1].index: [1, 4, 5, 6]})
    save_layout_checkpoint(model, adapter, layout, tmp_path, layout_config(model.config, adapter, layout))
    reloaded = moecompress.load(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    ids = token_batch(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=ATOL, rtol=1e-4)
