"""A condensed layer equals its fixed-weight masked form, on every adapter (fp32, tight tolerance).

The "fixed-weight masked form" is the model's OWN experts module called with the same fixed
experts S for every token and the fixed weights wbar_e as combine weights:
experts(x, index = S for all t, weights = wbar for all t) = sum_{e in S} wbar_e f_e(x).
The condensed form is one dense MLP (gate/up rows concatenated, down columns scaled).
Architectures that cannot be condensed are listed, with why, in tests/expected_skips.py.
"""

from __future__ import annotations

import pytest
import torch

from moecompress.condense.apply import (
    cast_model,
    condense_model,
    load_condensed,
    moe_layer_map,
    write_moecompress_layout,
)
from moecompress.condense.cd_moe import (
    CondensedExperts,
    DenseMLPWeights,
    check_condensable,
    concatenate_experts,
    condense_layer,
    pad_neurons,
)
from moecompress.models.adapters import get_adapter
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.expected_skips import CONDENSE_LAYER, CONDENSE_MODEL, expect_refusal
from tests.helpers import tiny_model, token_batch

ATOL = 2e-5
RTOL = 1e-4
EXPERTS = [5, 1, 6]
WEIGHTS = [0.35, 0.8, 1.3]
# architectures whose code forces float32 somewhere (so a float64 model cannot run)
FP32_ONLY = {"inkling2_text": "the router casts its input to float32"}


def _arch(test: str, name: str, dtype: torch.dtype = torch.float32):
    __tracebackhide__ = True  # a skip is reported at the calling test's line
    model = tiny_model(TINY_CONFIGS[name](), seed=0).to(dtype)
    if dtype == torch.float64:
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    with expect_refusal(test, name):  # listed: the architecture cannot be condensed
        for ref in layers:
            check_condensable(adapter, ref)
    return model, adapter, layers


def _fixed(ref, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor(EXPERTS).expand(tokens, -1)  # (T, |S|)
    weights = torch.tensor(WEIGHTS, dtype=torch.float64).expand(tokens, -1)  # (T, |S|)
    return index, weights


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_condensed_mlp_equals_fixed_weight_experts(name: str) -> None:
    model, adapter, layers = _arch(CONDENSE_LAYER, name)
    gen = torch.Generator().manual_seed(7)
    for ref in layers:
        x = torch.randn(33, model.config.hidden_size, generator=gen)
        index, weights = _fixed(ref, x.shape[0])
        weights = weights.to(x.dtype)
        with torch.no_grad():
            expected = ref.experts(x, index, weights)  # the module's own arithmetic
            mlp = condense_layer(adapter, ref, EXPERTS, WEIGHTS)
            dense = CondensedExperts.from_weights(mlp)(x, index, weights)
        canonical = adapter.expert_weights(ref, 0)
        assert mlp.width == len(EXPERTS) * canonical.intermediate_size
        # some experts modules (DBRX) return (T, 1, H) for a (T, H) input
        torch.testing.assert_close(dense, expected.reshape(dense.shape), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_condensed_model_equals_masked_model_and_round_trips(name: str, tmp_path) -> None:
    # float64: fp32 rounding (1e-6 per layer) is amplified to ~1e-4 in the logits of some tiny models
    dtype = torch.float32 if name in FP32_ONLY else torch.float64
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    model, adapter, layers = _arch(CONDENSE_MODEL, name, dtype)
    ids = token_batch(model.config.vocab_size)
    chosen = [ref.index for ref in layers][-2:]  # at most two layers, the last ones

    def fix_routing(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        index, weights = _fixed(None, hidden.numel() // hidden.shape[-1])
        return (hidden, index, weights.to(hidden.dtype)), {}

    handles = [ref.experts.register_forward_pre_hook(fix_routing, with_kwargs=True) for ref in layers
               if ref.index in chosen]
    with torch.no_grad():
        masked = model(ids).logits
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        plain = model(ids).logits
    assert not torch.allclose(masked, plain, atol=1e-3), "fixing the routing changed nothing"

    selection = {index: (EXPERTS, WEIGHTS) for index in chosen}
    condense_model(model, adapter, selection)
    assert all(isinstance(moe_layer_map(adapter, model)[i].experts, CondensedExperts) for i in chosen)
    with torch.no_grad():
        condensed = model(ids).logits
    torch.testing.assert_close(condensed, masked, atol=tol, rtol=tol)

    write_moecompress_layout(model, adapter, selection, None, tmp_path, {"operation": "condense"}, "test")
    reloaded = load_condensed(tmp_path)
    reloaded.set_experts_implementation("eager")
    with torch.no_grad():
        # same tensors; only memory alignment of the loaded weights may change BLAS rounding
        torch.testing.assert_close(reloaded(ids).logits, condensed, atol=tol, rtol=tol)


def test_concatenation_biases_and_padding_are_exact() -> None:
    gen = torch.Generator().manual_seed(0)

    def act(gate, up):
        return torch.nn.functional.silu(gate) * up

    def expert(width: int) -> DenseMLPWeights:
        return DenseMLPWeights(
            gate=torch.randn(width, 8, generator=gen), up=torch.randn(width, 8, generator=gen),
            down=torch.randn(8, width, generator=gen), gate_bias=torch.randn(width, generator=gen),
            up_bias=torch.randn(width, generator=gen), down_bias=torch.randn(8, generator=gen), act=act)

    parts = [expert(4), expert(4)]
    from moecompress.models.adapters.base import CanonicalExpert

    canonical = [CanonicalExpert(p.gate, p.up, p.down, p.gate_bias, p.up_bias, p.down_bias, act) for p in parts]
    mlp = concatenate_experts(canonical, [0.25, 2.0])
    x = torch.randn(5, 8, generator=gen)
    expected = 0.25 * parts[0].forward(x) + 2.0 * parts[1].forward(x)
    torch.testing.assert_close(mlp.forward(x), expected, atol=1e-5, rtol=1e-5)
    padded = pad_neurons(mlp, 13)
    assert padded.width == 13
    torch.testing.assert_close(padded.forward(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        pad_neurons(mlp, 3)


def test_tied_embeddings_round_trip(tmp_path) -> None:
    config = TINY_CONFIGS["qwen3_moe"]()
    config.tie_word_embeddings = True
    model = tiny_model(config, seed=0)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[-1].index
    selection = {layer: (EXPERTS, WEIGHTS)}
    condense_model(model, adapter, selection)
    write_moecompress_layout(model, adapter, selection, None, tmp_path, {}, "test")
    reloaded = load_condensed(tmp_path)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    ids = token_batch(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=ATOL, rtol=RTOL)


def test_bfloat16_cast_keeps_float32_modules() -> None:
    """Casting for saving follows transformers' keep-in-fp32 lists (Inkling2's router runs in float32)."""
    model = tiny_model(TINY_CONFIGS["inkling2_text"](), seed=0)
    cast_model(model, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if name.endswith("mlp.gate.weight"))
