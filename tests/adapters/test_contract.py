"""The adapter contract, run over every registered adapter on a tiny seeded model.

1. canonical expert weights reproduce the experts module's own forward;
2. `run_experts` (what the observer and GPTQ instrument) reproduces it too, and the
   instrumented model gives the same logits as the plain one;
3. a model with experts physically dropped gives the same logits as the original with those
   experts masked in the router (fp32, tight tolerance), group-limited routers included;
4. the pruned checkpoint reloads with `AutoModelForCausalLM.from_pretrained` and gives the
   same logits;
5. uniform-width neuron dropping equals zeroing those neurons, where the config can express it
   (the architectures whose config cannot are listed, with why, in tests/expected_skips.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.models.adapters import get_adapter, supported_model_types
from tests import expected_skips
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.expected_skips import CONTRACT_UNIFORM_NEURONS, expect_refusal
from tests.helpers import contract_keep, tiny_model, token_batch

ATOL = 2e-5


def test_every_adapter_has_a_tiny_config() -> None:
    missing = sorted(set(supported_model_types()) - set(TINY_CONFIGS))
    assert not missing, f"adapters without a tiny config in tests/adapters/tiny_configs.py: {missing}"


def test_expected_skips_table_is_current() -> None:
    """tests/expected_skips.py names real tests and registered architectures, and its docstring table matches."""
    import importlib
    from pathlib import Path

    tests_dir = Path(__file__).resolve().parents[1]
    for test in expected_skips.KNOWN_TESTS:
        file, _, function = test.partition("::")
        assert (tests_dir / file).is_file(), test
        module = importlib.import_module("tests." + file.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, function.split(" ")[0], None)), test
    doc_rows = {tuple(cell.strip() for cell in line.strip("|").split("|"))
                for line in expected_skips.__doc__.splitlines() if line.startswith("| test_")}
    listed = set()
    for (test, case), refusal in expected_skips.EXPECTED_REFUSALS.items():
        assert test in expected_skips.KNOWN_TESTS, test
        assert case in TINY_CONFIGS, f"{test}: {case} is not a registered tiny architecture"
        if test not in expected_skips.NOT_SKIPS:
            listed.add((test.partition("::")[2].split(" ")[0], case, refusal.reason))
    assert listed == doc_rows, "the table at the top of tests/expected_skips.py differs from EXPECTED_REFUSALS"


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request):
    config = TINY_CONFIGS[request.param]()
    model = tiny_model(config, seed=0)
    return request.param, model, get_adapter(model)


def test_canonical_experts_reproduce_module_forward(arch) -> None:
    name, model, adapter = arch
    layers = adapter.moe_layers(model)
    assert layers, f"{name}: no MoE layers found"
    gen = torch.Generator().manual_seed(3)
    for layer in layers:
        hidden = torch.randn(40, model.config.hidden_size, generator=gen)
        route = adapter.route(layer, hidden)
        assert route.logits.shape == (40, layer.num_experts)
        expected = layer.experts(hidden, route.index, route.weights).reshape(hidden.shape)
        canonical = torch.zeros_like(hidden)
        for e in range(layer.num_experts):
            rows, slots = torch.where(route.index == e)
            if len(rows) == 0:
                continue
            out = adapter.expert_weights(layer, e).forward(hidden[rows])
            canonical.index_add_(0, rows, out * route.weights[rows, slots, None])
        torch.testing.assert_close(canonical, expected, atol=ATOL, rtol=1e-4)
        grouped = adapter.run_experts(layer, hidden, route.index, route.weights)
        torch.testing.assert_close(grouped, expected, atol=ATOL, rtol=1e-4)


def test_instrumented_model_matches_plain(arch) -> None:
    name, model, adapter = arch
    ids = token_batch(model.config.vocab_size)
    with torch.no_grad():
        plain = model(ids).logits
    counts: dict[int, int] = {}

    def visitor_for(layer_index):
        def visit(expert, token_idx, slot, x, act, out, gate):
            counts[layer_index] = counts.get(layer_index, 0) + len(token_idx)

        return visit

    layers = adapter.moe_layers(model)
    with adapter.instrument(model, {ref.index: visitor_for(ref.index) for ref in layers}), torch.no_grad():
        instrumented = model(ids).logits
    torch.testing.assert_close(instrumented, plain, atol=ATOL, rtol=1e-4)
    for ref in layers:
        assert counts[ref.index] == ids.numel() * ref.top_k


def test_dropped_equals_masked_and_reloads(arch, tmp_path) -> None:
    name, model, adapter = arch
    layers = adapter.moe_layers(model)
    keep = {ref.index: contract_keep(adapter, model.config, ref.num_experts) for ref in layers}
    ids = token_batch(model.config.vocab_size)
    with torch.no_grad():
        plain = model(ids).logits
        with adapter.mask_experts(model, keep):
            masked = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(after, plain, atol=0, rtol=0)  # masking is fully undone
    assert not torch.allclose(masked, plain, atol=1e-4), "masking changed nothing: routing not decisive"

    dropped = adapter.drop(model, keep_experts=keep)
    with torch.no_grad():
        dropped_logits = dropped(ids).logits
    torch.testing.assert_close(dropped_logits, masked, atol=ATOL, rtol=1e-4)
    new_count = len(next(iter(keep.values())))
    assert adapter.num_experts(dropped.config) == new_count
    for ref in adapter.moe_layers(dropped):
        assert ref.num_experts == new_count

    dropped.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        reloaded_logits = reloaded(ids).logits
    torch.testing.assert_close(reloaded_logits, dropped_logits, atol=ATOL, rtol=1e-4)


def test_uniform_neuron_drop_equals_zeroed_neurons(arch) -> None:
    name, model, adapter = arch
    layers = adapter.moe_layers(model)
    width = adapter.expert_weights(layers[0], 0).intermediate_size
    gen = torch.Generator().manual_seed(5)
    keep = {ref.index: torch.stack([torch.randperm(width, generator=gen)[: width // 2] for _ in range(ref.num_experts)])
            for ref in layers}
    with expect_refusal(CONTRACT_UNIFORM_NEURONS, name):  # listed: the config cannot express a narrower width
        dropped = adapter.drop(model, keep_neurons=keep)
    reference = tiny_model(model.config, seed=0)
    with torch.no_grad():
        for ref in adapter.moe_layers(reference):
            for e in range(ref.num_experts):
                canon = adapter.expert_weights(ref, e)
                drop_mask = torch.ones(width, dtype=torch.bool)
                drop_mask[keep[ref.index][e]] = False
                canon.down[:, drop_mask] = 0  # a view into the fused parameter
    ids = token_batch(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(dropped(ids).logits, reference(ids).logits, atol=ATOL, rtol=1e-4)
