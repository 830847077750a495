"""The CD-MoE searches: expert greedy (reconstruction and JS), wbar, layer greedy on cached inputs."""

from __future__ import annotations

import pytest
import torch

from moecompress.calibration.calibrate import collect_statistics
from moecompress.calibration.request import ObservedPass
from moecompress.calibration.stats import RoutingStats
from moecompress.condense.apply import build_condensed_modules, moe_layer_map, swapped_experts
from moecompress.condense.search import (
    LayerRouting,
    greedy_by_reconstruction,
    js_divergence,
    relative_squared_error,
    search_condensation,
)
from moecompress.errors import MoecompressError
from moecompress.models.adapters import get_adapter
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch


def _qwen3(layers: int = 4):
    config = TINY_CONFIGS["qwen3_moe"]()
    config.num_hidden_layers = layers  # layer 0 dense, MoE layers 1..layers-1
    model = tiny_model(config, seed=0)
    return model, get_adapter(model)


def _batches(model, count: int = 2):
    return [("text", token_batch(model.config.vocab_size, batch=2, length=16, seed=10 + i)) for i in range(count)]


def test_greedy_reconstruction_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    experts, tokens, hidden = 6, 50, 5
    outputs = torch.randn(experts, tokens, hidden, generator=gen, dtype=torch.float64)  # f_e(x_t)
    weights = torch.rand(experts, generator=gen, dtype=torch.float64) + 0.2
    target = (0.7 * outputs[1] + 0.5 * outputs[4] + 0.1 * torch.randn(tokens, hidden, generator=gen,
                                                                      dtype=torch.float64))
    flat = outputs.reshape(experts, -1)
    routing = LayerRouting(count=torch.full((experts,), 3.0, dtype=torch.float64), gate_sum=3 * weights,
                           gram=flat @ flat.T, cross=flat @ target.reshape(-1), target_sq=float(target.pow(2).sum()))
    chosen, steps = greedy_by_reconstruction(routing, 3)

    def error(subset):
        approx = sum(weights[e] * outputs[e] for e in subset)
        return float((target - approx).pow(2).sum() / target.pow(2).sum())

    expected: list[int] = []
    for step in range(3):
        best = min((e for e in range(experts) if e not in expected), key=lambda e: error(expected + [e]))
        expected.append(best)
        assert steps[step] == pytest.approx(error(expected), rel=1e-9)
    assert chosen == expected


def test_unrouted_experts_are_never_chosen() -> None:
    routing = LayerRouting(count=torch.tensor([0.0, 2.0, 0.0]), gate_sum=torch.tensor([0.0, 1.0, 0.0]),
                           gram=torch.eye(3, dtype=torch.float64), cross=torch.tensor([5.0, 0.1, 5.0]).double(),
                           target_sq=10.0)
    assert greedy_by_reconstruction(routing, 1)[0] == [1]
    with pytest.raises(MoecompressError, match="received calibration tokens"):
        greedy_by_reconstruction(routing, 2)


def test_js_divergence_properties() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    assert js_divergence([a], [a]) == pytest.approx(0.0, abs=1e-7)
    assert js_divergence([a], [b]) == pytest.approx(js_divergence([b], [a]), rel=1e-6)
    p, q = torch.softmax(a.reshape(-1, 7), -1), torch.softmax(b.reshape(-1, 7), -1)
    m = (p + q) / 2
    direct = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert js_divergence([a], [b]) == pytest.approx(float(direct.mean()), rel=1e-5)
    assert relative_squared_error([a], [2 * a]) == pytest.approx(1.0, rel=1e-6)


def test_mean_gate_equals_observer_soft_count_over_count() -> None:
    model, adapter = _qwen3(3)
    batches = _batches(model)
    plan = search_condensation(model, adapter, batches, 2, layers=[1, 2], progress=False)
    ids = torch.cat([b for _, b in batches])
    observer = collect_statistics(model, adapter, ids, torch.zeros(ids.shape[0], dtype=torch.long), ["text"],
                                  ObservedPass(statistics=["count", "soft_count"]), False)
    tensors = observer.tensors()
    for layer in plan.layers:
        count = tensors[RoutingStats.key("count", layer, "text")].double()
        soft = tensors[RoutingStats.key("soft_count", layer, "text")].double()
        expected = [float(soft[e] / count[e]) for e in plan.experts[layer]]
        assert plan.weights[layer] == pytest.approx(expected, rel=1e-5)


def test_reported_reconstruction_error_is_the_real_one() -> None:
    """err(S)/Y from the one-pass statistics equals the error measured on the experts module directly."""
    model, adapter = _qwen3(3)
    batches = _batches(model)
    plan = search_condensation(model, adapter, batches, 3, layers=[2], progress=False)
    ref = moe_layer_map(adapter, model)[2]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = ref.experts.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        for _, ids in batches:
            model(ids)
    handle.remove()
    module = build_condensed_modules(model, adapter, plan.condensed())[2]
    with torch.no_grad():
        num = sum(float((out - module(x)).pow(2).sum()) for x, out in seen)
    den = sum(float(out.pow(2).sum()) for _, out in seen)
    assert plan.expert_search[2][-1] == pytest.approx(num / den, rel=1e-4)


def _last_layer_output(model, adapter, batches, selection) -> list[torch.Tensor]:
    """The last decoder layer's output for each batch, from ordinary full forwards."""
    refs = moe_layer_map(adapter, model)
    outs: list[torch.Tensor] = []
    last = adapter.decoder_layers(model)[-1]
    handle = last.register_forward_hook(lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out))
    with swapped_experts(refs, build_condensed_modules(model, adapter, selection, refs)), torch.no_grad():
        for _, ids in batches:
            model(ids)
    handle.remove()
    return outs


@pytest.mark.parametrize("criterion", ["recon", "js"])
def test_layer_search_on_cached_inputs_matches_full_forwards(criterion: str) -> None:
    model, adapter = _qwen3(4)  # MoE layers 1, 2, 3
    batches = _batches(model)
    plan = search_condensation(model, adapter, batches, 2, num_layers=2, criterion=criterion, progress=False)
    divergence = relative_squared_error if criterion == "recon" else js_divergence
    reference = _last_layer_output(model, adapter, batches, {})
    selection = {i: (plan.searched_experts[i], plan.searched_weights[i]) for i in plan.expert_search}
    singles = {i: divergence(reference, _last_layer_output(model, adapter, batches, {i: selection[i]}))
               for i in selection}
    first = plan.layers[0]
    assert first == min(singles, key=singles.get)
    assert plan.layer_search[0] == pytest.approx(singles[first], rel=1e-4)
    pair = {i: selection[i] for i in plan.layers}
    both = divergence(reference, _last_layer_output(model, adapter, batches, pair))
    assert plan.layer_search[1] == pytest.approx(both, rel=1e-4)
    assert len(plan.layers) == 2 and plan.layer_selection == "auto"
    assert plan.cost["decoder_layer_passes"] > 0 and plan.cost["tokens"] == 2 * 2 * 16
    assert set(plan.experts) == set(plan.layers)
    assert all(len(plan.experts[i]) == 2 == len(set(plan.experts[i])) for i in plan.layers)
    assert all(len(v) == 2 for v in plan.expert_search.values())


def test_bad_choices_are_one_line_errors() -> None:
    model, adapter = _qwen3(3)
    batches = _batches(model, 1)
    with pytest.raises(MoecompressError, match="not MoE layers"):
        search_condensation(model, adapter, batches, 2, layers=[0], progress=False)
    with pytest.raises(MoecompressError, match="more than"):
        search_condensation(model, adapter, batches, 9, layers=[1], progress=False)
    with pytest.raises(MoecompressError, match="num-layers"):
        search_condensation(model, adapter, batches, 2, num_layers=5, progress=False)
    with pytest.raises(MoecompressError, match="criterion"):
        search_condensation(model, adapter, batches, 2, criterion="kl", progress=False)


@pytest.mark.parametrize("name", ["deepseek_v3", "gpt_oss", "nemotron_h", "jamba", "dbrx", "qwen2_moe"])
def test_search_runs_on_diverse_architectures(name: str) -> None:
    """Group-limited routers, expert biases, non-gated experts, hybrid layers, nested configs, gated shared experts."""
    model = tiny_model(TINY_CONFIGS[name](), seed=0)
    adapter = get_adapter(model)
    batches = [("text", token_batch(model.config.vocab_size, batch=2, length=8, seed=3))]
    plan = search_condensation(model, adapter, batches, 2, num_layers=1, progress=False)
    moe = {ref.index for ref in adapter.moe_layers(model)}
    assert len(plan.layers) == 1 and plan.layers[0] in moe and set(plan.expert_search) == moe
    weights = plan.weights[plan.layers[0]]
    assert all(w > 0 for w in weights)
    with swapped_experts(moe_layer_map(adapter, model), build_condensed_modules(model, adapter, plan.condensed())):
        with torch.no_grad():
            logits = model(batches[0][1]).logits
    assert torch.isfinite(logits).all()
