"""Adapter behaviour the contract test does not reach, for batch-B (sigmoid / bias / group) routers."""

from __future__ import annotations

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.models.adapters import get_adapter
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch

ATOL = 2e-5


def _every_other(adapter, model) -> dict[int, list[int]]:
    return {ref.index: list(range(0, ref.num_experts, 2)) for ref in adapter.moe_layers(model)}


def test_lfm2_without_expert_bias_drop_equals_mask() -> None:
    config = TINY_CONFIGS["lfm2_moe"]()
    config.use_expert_bias = False
    model = tiny_model(config, seed=0)
    adapter = get_adapter(model)
    keep = _every_other(adapter, model)
    ids = token_batch(config.vocab_size)
    with torch.no_grad():
        plain = model(ids).logits
        with adapter.mask_experts(model, keep):
            masked = model(ids).logits
        dropped = adapter.drop(model, keep_experts=keep)(ids).logits
    assert not torch.allclose(masked, plain, atol=1e-4)
    torch.testing.assert_close(dropped, masked, atol=ATOL, rtol=1e-4)


def test_deepseek_v2_groups_only_for_group_limited_method() -> None:
    config = TINY_CONFIGS["deepseek_v2"]()
    adapter = get_adapter(config)
    assert adapter.groups(config) == (2, 1)
    config.topk_method = "greedy"
    assert adapter.groups(config) is None


@pytest.mark.parametrize("model_type", ["deepseek_v3", "ernie4_5_moe", "hy_v3", "afmoe", "kimi_linear"])
def test_shared_width_blocks_refuse_neuron_pruning_with_a_clear_error(model_type: str) -> None:
    adapter = get_adapter(TINY_CONFIGS[model_type]())
    with pytest.raises(MoecompressError, match="shared experts' width"):
        adapter.check_width_patchable(TINY_CONFIGS[model_type]())


def test_shared_width_check_passes_without_shared_experts() -> None:
    config = TINY_CONFIGS["deepseek_v3"]()
    config.n_shared_experts = 0
    get_adapter(config).check_width_patchable(config)


@pytest.mark.parametrize("model_type", ["dbrx", "inkling_text"])
def test_generic_per_tensor_slicing_is_refused_where_it_would_corrupt(model_type: str) -> None:
    model = tiny_model(TINY_CONFIGS[model_type](), seed=0)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[0]
    with pytest.raises(MoecompressError, match="per-layer"):
        adapter.expert_param_names(layer)


def test_inkling_masks_only_routed_router_rows() -> None:
    model = tiny_model(TINY_CONFIGS["inkling_text"](), seed=0)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[0]
    assert layer.num_experts == model.config.n_routed_experts
    hidden = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    keep = {layer.index: [1, 3, 5, 7]}
    with torch.no_grad(), adapter.mask_experts(model, keep):
        _, _, index, shared = layer.router(hidden)
    plain_shared = layer.router(hidden)[3]
    assert set(index.flatten().tolist()) <= set(keep[layer.index])
    assert torch.all(shared.abs() > 1e-4), "the shared experts' gate must not be masked"
    assert not torch.allclose(shared, plain_shared), "renormalisation runs over the kept experts"
