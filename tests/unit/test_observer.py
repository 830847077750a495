"""Hand-checkable observer statistics against slow reference loops, and mode equivalence."""

from __future__ import annotations

import pytest
import torch

from moecompress.calibration.calibrate import build_stats, collect_statistics
from moecompress.calibration.request import ObservedPass
from moecompress.calibration.observer import DEFAULT_STATISTICS
from moecompress.calibration.stats import RoutingStats
from moecompress.errors import MoecompressError
from moecompress.models.adapters import get_adapter
from moecompress.engine.reader import CheckpointReader
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch

DOMAINS = ["a", "b"]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    adapter = get_adapter(model)
    ids = token_batch(model.config.vocab_size, batch=4, length=16, seed=2)
    domain_ids = torch.tensor([0, 0, 1, 1])
    return model, adapter, ids, domain_ids


def _reference(model, adapter, ids):
    """Slow per-token loop: per layer, per token, per chosen expert, via canonical weights."""
    layers = adapter.moe_layers(model)
    inputs, residuals = {}, {}
    handles = []
    for ref in layers:
        handles.append(ref.block.register_forward_pre_hook(
            lambda m, a, _i=ref.index: inputs.__setitem__(_i, a[0].reshape(-1, a[0].shape[-1]).clone())))
        norm = adapter.residual_module(model, ref)
        handles.append(norm.register_forward_pre_hook(
            lambda m, a, _i=ref.index: residuals.__setitem__(_i, a[0].reshape(-1, a[0].shape[-1]).clone())))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    result = {}
    for ref in layers:
        x, h = inputs[ref.index], residuals[ref.index]
        with torch.no_grad():
            route = adapter.route(ref, x)
        E = ref.num_experts
        count = torch.zeros(E, dtype=torch.float64)
        soft = torch.zeros(E, dtype=torch.float64)
        reap = torch.zeros(E, dtype=torch.float64)
        easy = torch.zeros(E, dtype=torch.float64)
        top1 = torch.zeros(E, dtype=torch.float64)
        for t in range(x.shape[0]):
            outs = []
            for slot in range(ref.top_k):
                e = int(route.index[t, slot])
                g = float(route.weights[t, slot])
                with torch.no_grad():
                    f = adapter.expert_weights(ref, e).forward(x[t : t + 1])[0].double()
                outs.append((e, g, f))
            y = sum(g * f for _, g, f in outs)
            s = max(0.0, 1.0 - float(torch.nn.functional.cosine_similarity(h[t].double(), h[t].double() + y, dim=0)))
            for e, g, f in outs:
                count[e] += 1
                soft[e] += g
                reap[e] += g * f.norm()
                easy[e] += g * f.norm() * s
            j = int(route.logits[t].argmax())
            top1[j] += float(route.logits[t, j])
        result[ref.index] = dict(count=count, soft_count=soft, gated_out_norm=reap, easy_ep=easy, top1_logit=top1)
    return result


def test_statistics_match_slow_reference(setup) -> None:
    model, adapter, ids, _ = setup
    observer = collect_statistics(model, adapter, ids, torch.zeros(len(ids), dtype=torch.long), ["all"],
                                  ObservedPass(mode="whole-model"), False)
    reference = _reference(model, adapter, ids)
    for ref in adapter.moe_layers(model):
        sums = observer.observers[ref.index].sums["all"]
        assert sums["count"].sum() == ids.numel() * ref.top_k
        for name, expected in reference[ref.index].items():
            torch.testing.assert_close(sums[name], expected, rtol=1e-5, atol=1e-6, msg=f"{name} layer {ref.index}")
        assert observer.observers[ref.index].tokens["all"] == ids.numel()


def test_layerwise_equals_whole_model(setup) -> None:
    model, adapter, ids, domain_ids = setup
    whole = collect_statistics(model, adapter, ids, domain_ids, DOMAINS,
                               ObservedPass(mode="whole-model", batch_size=2), False)
    layerwise = collect_statistics(model, adapter, ids, domain_ids, DOMAINS,
                                   ObservedPass(mode="layerwise", batch_size=2), False)
    a, b = whole.tensors(), layerwise.tensors()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-9, msg=key)
    assert whole.token_counts() == layerwise.token_counts()


def test_checkpoint_read_layer_by_layer_matches_in_memory(setup, tmp_path) -> None:
    """The engine over a CheckpointReader (meta skeleton, one layer loaded at a time) gives the whole-model stats."""
    model, adapter, ids, domain_ids = setup
    model.save_pretrained(tmp_path / "ckpt")
    reader = CheckpointReader(tmp_path / "ckpt", dtype="float32")
    in_memory = collect_statistics(model, adapter, ids, domain_ids, DOMAINS,
                                   ObservedPass(mode="whole-model", batch_size=2), False)
    streamed = collect_statistics(reader.model, reader.adapter, ids, domain_ids, DOMAINS,
                                  ObservedPass(batch_size=2, reader=reader), False)
    a, b = in_memory.tensors(), streamed.tensors()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-9, msg=key)
    assert in_memory.token_counts() == streamed.token_counts()
    # every decoder layer is back on the meta device: nothing of the model stays in memory
    assert all(p.device.type == "meta" for p in reader.model.parameters())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "mixtral", "gpt_oss"])
def test_gradient_statistics_layer_by_layer_equal_the_whole_model_backward(model_type: str, tmp_path) -> None:
    """HEAPr's statistics from a checkpoint read one layer at a time (the backward pass streamed) = whole-model ones."""
    model = tiny_model(TINY_CONFIGS[model_type](), seed=0).float()
    adapter = get_adapter(model)
    ids = token_batch(model.config.vocab_size, batch=4, length=16, seed=2)
    domain_ids = torch.tensor([0, 0, 1, 1])
    names = [*DEFAULT_STATISTICS, "neuron_grad_proj"]
    whole = collect_statistics(model, adapter, ids, domain_ids, DOMAINS,
                               ObservedPass(statistics=names, mode="whole-model", batch_size=2), False)
    model.save_pretrained(tmp_path / "ckpt")
    reader = CheckpointReader(tmp_path / "ckpt", dtype="float32")
    streamed = collect_statistics(reader.model, reader.adapter, ids, domain_ids, DOMAINS,
                                  ObservedPass(statistics=names, batch_size=2, reader=reader), False)
    a, b = whole.tensors(), streamed.tensors()
    assert a.keys() == b.keys() and any("neuron_grad_proj" in key for key in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-9, msg=key)
    assert whole.token_counts() == streamed.token_counts()
    assert all(p.device.type == "meta" for p in reader.model.parameters())


def test_gradient_statistic_uses_exact_identity(setup) -> None:
    """neuron_grad_proj equals sum_t (g'_t . w_k)^2 computed from autograd on a dense per-token path."""
    model, adapter, ids, _ = setup
    ids = ids[:1, :8]
    observer = collect_statistics(model, adapter, ids, torch.zeros(1, dtype=torch.long), ["all"],
                                  ObservedPass(statistics=["count", "neuron_grad_proj"], mode="whole-model"), False)
    ref = adapter.moe_layers(model)[-1]
    # Reference: retain the grad of each expert output through a forward hook on the down projection input.
    captured = []

    def visit(expert, token_idx, slot, x, act, out, gate):
        out.retain_grad()
        captured.append((expert, out))

    for p in model.parameters():
        p.requires_grad_(False)
    h = model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_(True))
    with adapter.instrument(model, {ref.index: visit}):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    h.remove()
    expected = torch.zeros(ref.num_experts, adapter.expert_weights(ref, 0).intermediate_size, dtype=torch.float64)
    for expert, out in captured:
        down = adapter.expert_weights(ref, expert).down.double()  # (H, I)
        expected[expert] += (out.grad.double() @ down).square().sum(0)
    got = observer.observers[ref.index].sums["all"]["neuron_grad_proj"]
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)


def test_stats_round_trip_and_refuse_other_model(setup, tmp_path) -> None:
    model, adapter, ids, domain_ids = setup
    observer = collect_statistics(model, adapter, ids, domain_ids, DOMAINS, ObservedPass(batch_size=2), False)
    stats = build_stats(model, observer, "tiny", "digest", {"note": "test"}, "layerwise", 0)
    stats.save(tmp_path / "stats")
    loaded = RoutingStats.load(tmp_path / "stats", expect_config=model.config)
    layer = loaded.header.moe_layers[0]
    torch.testing.assert_close(loaded.get("count", layer), stats.get("count", layer))
    torch.testing.assert_close(loaded.get("count", layer, "a") + loaded.get("count", layer, "b"), loaded.get("count", layer))
    assert loaded.tokens(layer) == ids.numel()
    assert loaded.digest() == stats.digest()
    other = adapter.patched_config(model.config, num_experts=4)
    with pytest.raises(MoecompressError, match="different model"):
        RoutingStats.load(tmp_path / "stats", expect_config=other)
    with pytest.raises(MoecompressError, match="not collected"):
        loaded.get("neuron_grad_proj", layer)
    assert set(DEFAULT_STATISTICS) == set(loaded.header.statistics)
