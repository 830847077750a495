"""NAEE dynamic skipping: thresholds from calibration routing, and the skipping experts path is exact."""

from __future__ import annotations

import copy

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.models.adapters import get_adapter
from moecompress.prune.dynamic_skip import (
    install_dynamic_skip,
    measure_betas,
    router_weights,
    second_to_first,
    skip_counts,
    skip_settings,
)
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch


def test_second_to_first_by_hand() -> None:
    weights = torch.tensor([[0.6, 0.3], [0.1, 0.4], [0.0, 0.0]])
    assert second_to_first(weights).tolist() == [0.5, 0.25, 0.0]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    adapter = get_adapter(model)
    batches = [("a", token_batch(model.config.vocab_size, batch=2, length=16, seed=s)) for s in (1, 2)]
    return model, adapter, batches


def test_betas_are_medians_and_half_the_second_calls_are_skipped(setup) -> None:
    model, adapter, batches = setup
    ratios: dict[int, list[torch.Tensor]] = {}
    handles = [ref.router.register_forward_hook(
        lambda m, a, out, _i=ref.index: ratios.setdefault(_i, []).append(second_to_first(router_weights(out))))
        for ref in adapter.moe_layers(model)]
    with torch.no_grad():
        for _, ids in batches:
            model(ids)
    for handle in handles:
        handle.remove()
    betas, fraction = measure_betas(model, adapter, batches, progress=False)
    for layer, parts in ratios.items():
        assert betas[layer] == pytest.approx(float(torch.cat(parts).median()))
    # about half the tokens skip one of their two calls (measured with skipping applied, so later
    # layers see slightly different routing than the thresholds were set on)
    assert 0.15 <= fraction <= 0.35


def test_installed_skipping_equals_zeroed_second_weights(setup) -> None:
    model, adapter, batches = setup
    betas, fraction = measure_betas(model, adapter, batches, progress=False)
    ids = token_batch(model.config.vocab_size, batch=2, length=16, seed=9)

    reference = copy.deepcopy(model)
    for ref in adapter.moe_layers(reference):
        beta = betas[ref.index]

        def zero_second(module, args, output, _beta=beta):
            weights = output[1].clone()
            ratio = second_to_first(weights)
            low = weights.abs().argmin(dim=-1)
            rows = torch.nonzero(ratio < _beta).flatten()
            weights[rows, low[rows]] = 0
            return (output[0], weights, output[2])

        ref.router.register_forward_hook(zero_second)
    skipping = copy.deepcopy(model)
    install_dynamic_skip(skipping, skip_settings(betas, fraction))
    with torch.no_grad():
        expected = reference(ids).logits
        got = skipping(ids).logits
        plain = model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)
    counts = skip_counts(skipping)
    assert counts["calls"] == ids.numel() * 2 * len(adapter.moe_layers(model)) and counts["skipped"] > 0

    install_dynamic_skip(skipping := copy.deepcopy(model), skip_settings(betas, fraction))
    with torch.no_grad():
        for _, calib_ids in batches:
            skipping(calib_ids)
    counts = skip_counts(skipping)
    assert counts["skipped"] / counts["calls"] == pytest.approx(fraction, abs=0.01)


def test_top1_routers_are_refused() -> None:
    model = tiny_model(TINY_CONFIGS["llama4_text"](), seed=0)
    with pytest.raises(MoecompressError, match="top-2"):
        measure_betas(model, get_adapter(model), [("a", token_batch(model.config.vocab_size))], progress=False)
    with pytest.raises(MoecompressError, match="not installed"):
        skip_counts(model)


def test_layout_checkpoint_keeps_its_skip_thresholds(setup, tmp_path) -> None:
    import moecompress
    from moecompress.prune.materialize import write_pruned
    from moecompress.prune.plan import PrunePlan

    model, adapter, batches = setup
    layers = [ref.index for ref in adapter.moe_layers(model)]
    keep = {layers[0]: [0, 1, 2, 3, 4], layers[1]: [1, 3, 5]}
    betas, fraction = measure_betas(model, adapter, batches, keep, progress=False)
    plan = PrunePlan(method="frequency", allocation="global", num_experts=8, top_k=2, keep=keep, dynamic_skip=betas,
                     skip_fraction=fraction)
    written = write_pruned(copy.deepcopy(model), adapter, plan, None, tmp_path / "out", {"method": "frequency"}, tmp_path)
    assert written.format == "moecompress-layout" and written.notice
    loaded = moecompress.load(written.path)
    ids = token_batch(model.config.vocab_size, batch=2, length=16, seed=9)
    with torch.no_grad():
        logits = loaded(ids).logits
    assert torch.isfinite(logits).all() and skip_counts(loaded)["skipped"] > 0
