"""Write condensed layers as ordinary dense MLP layers that plain transformers loads.

Some configs can make chosen decoder layers dense:

* a list of dense layers: Qwen3-MoE, Flint (`mlp_only_layers`); all dense layers share one
  width (`intermediate_size`);
* per-layer types: DeepSeek-V3.2, GLM-MoE-DSA, GLM-4-MoE-Lite, Kimi-Linear, MiMo-V2-Flash,
  EXAONE-MoE (`mlp_layer_types[i]` = "dense" | "sparse");
* only a prefix: DeepSeek-V2/V3 and relatives (`first_k_dense_replace`), LFM2-MoE and AFMoE
  (`num_dense_layers`): the condensed layers must be exactly the first MoE layers.

A condensed layer becomes that dense MLP: the condensed routed experts' neurons, then the
shared experts' neurons (their outputs are added), zero-padded to the common width, and every
pre-existing dense layer is zero-padded to the same width (exact: a zero neuron adds nothing).
Each written layer is checked numerically against the condensed block it replaces, so an
architecture whose block gates or scales its shared experts (Qwen2-MoE, Qwen3-Next: a
token-dependent sigmoid gate) is refused rather than written wrong; the caller then writes
moecompress's own layout (`apply.py`).

The per-architecture facts below (config keys, dense-MLP parameter names) describe how each
transformers model class builds its dense layers; they are checked by the round-trip test in
tests/unit/condense/test_transformers_layout.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moecompress.condense.cd_moe import CondensedExperts, DenseMLPWeights, append_mlp, pad_neurons
from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import _is_non_persistent
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef


class NotExpressible(MoecompressError):
    """The config cannot hold these condensed layers as dense layers (the message says why)."""


@dataclass(frozen=True)
class DenseSlots:
    """How a config marks decoder layers dense, and how its dense MLP names its projections."""

    kind: str  # "list" | "types" | "prefix"
    key: str  # config key: list of dense layers, per-layer types, or number of leading dense layers
    width_key: str = "intermediate_size"  # config key of the dense MLP width
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down nn.Linear children


_LIST = DenseSlots("list", "mlp_only_layers")
_TYPES = DenseSlots("types", "mlp_layer_types")
_FIRST_K = DenseSlots("prefix", "first_k_dense_replace")
_NUM_DENSE = DenseSlots("prefix", "num_dense_layers")

DENSE_SLOTS: dict[str, DenseSlots] = {
    "qwen3_moe": _LIST,
    "flint": _LIST,
    "deepseek_v2": _FIRST_K,
    "deepseek_v3": _FIRST_K,
    "glm4_moe": _FIRST_K,
    "dots1": _FIRST_K,
    "afmoe": _NUM_DENSE,
    "lfm2_moe": DenseSlots("prefix", "num_dense_layers", names=("w1", "w3", "w2")),
    "deepseek_v32": _TYPES,
    "glm_moe_dsa": _TYPES,
    "glm4_moe_lite": _TYPES,
    "kimi_linear": _TYPES,
    "mimo_v2_flash": _TYPES,
    "exaone_moe": _TYPES,
}
# Architectures checked and refused, with the reason (the moecompress layout is written instead).
REFUSED: dict[str, str] = {
    "qwen2_moe": "its shared expert is scaled per token by a sigmoid gate (shared_expert_gate), so a condensed "
                 "layer is not one dense MLP",
    "qwen3_next": "its shared expert is scaled per token by a sigmoid gate (shared_expert_gate)",
    "qwen3_5_moe_text": "its shared expert is scaled per token by a sigmoid gate (shared_expert_gate)",
    "beam": "the block multiplies the routed output by routed_scaling_factor outside the experts",
    "axk1": "the MoE block normalises its output (post_mlp_layernorm) and its dense layers do not",
    "hy_v4": "its experts clamp the SwiGLU (swiglu_limit) and its dense MLP does not",
    "axk2": "its dense layers are laid out differently from its MoE layers",
}


def dense_slots(config: Any) -> DenseSlots:
    """The dense-layer mechanism of a config, or `NotExpressible`."""
    model_type = getattr(config, "model_type", None)
    slots = DENSE_SLOTS.get(model_type)
    if slots is None:
        reason = REFUSED.get(model_type, "the config has no way to make chosen MoE layers dense")
        raise NotExpressible(f"{model_type}: {reason}")
    return slots


def read_mlp(module: nn.Module, names: tuple[str, str, str], act: Any, dtype: torch.dtype) -> DenseMLPWeights:
    """A dense MLP module (gate, up, down nn.Linear children named `names`) as `DenseMLPWeights`."""
    try:
        gate, up, down = (getattr(module, name) for name in names)
    except AttributeError:
        raise NotExpressible(f"{type(module).__name__} is not a gate/up/down MLP") from None

    def bias(linear: nn.Module) -> torch.Tensor | None:
        return None if getattr(linear, "bias", None) is None else linear.bias.detach().to(dtype)

    return DenseMLPWeights(gate.weight.detach().to(dtype), up.weight.detach().to(dtype), down.weight.detach().to(dtype),
                           bias(gate), bias(up), bias(down), act)


def patched_dense_config(config: Any, slots: DenseSlots, condensed: list[int], moe_layers: list[int], width: int
                         ) -> Any:
    """A copy of `config` whose condensed layers are dense, all dense layers `width` wide."""
    new = copy.deepcopy(config)
    if slots.kind == "list":
        setattr(new, slots.key, sorted(set(getattr(config, slots.key) or []) | set(condensed)))
    elif slots.kind == "types":
        types = list(getattr(config, slots.key))
        for index in condensed:
            types[index] = "dense"
        setattr(new, slots.key, types)
    else:
        first = int(getattr(config, slots.key))
        wanted = [i for i in sorted(moe_layers)][: len(condensed)]
        if sorted(condensed) != wanted or (moe_layers and min(moe_layers) != first):
            raise NotExpressible(
                f"{config.model_type} makes only the first layers dense ({slots.key}={first}); the condensed layers "
                f"must be the first MoE layers {', '.join(map(str, sorted(moe_layers)[: len(condensed)]))}")
        setattr(new, slots.key, first + len(condensed))
    setattr(new, slots.width_key, int(width))
    return new


def _dense_mlp_modules(adapter: MoEAdapter, model: nn.Module, skip: set[int], names: tuple[str, str, str]
                       ) -> dict[int, tuple[str, nn.Module]]:
    """Decoder index -> (path, module) of the dense MLPs of layers not in `skip`."""
    out = {}
    for index, layer in enumerate(adapter.decoder_layers(model)):
        if index in skip:
            continue
        for attr in adapter.block_attrs:
            module = getattr(layer, attr, None)
            if module is not None and all(hasattr(module, name) for name in names):
                out[index] = (f"{adapter.layers_path}.{index}.{attr}", module)
                break
    return out


def to_transformers_model(model: nn.Module, adapter: MoEAdapter, condensed_layers: list[int],
                          verify_tokens: int = 16) -> tuple[nn.Module, dict[str, Any]]:
    """A new model whose condensed layers are dense MLP layers of a patched stock config.

    `model` is a condensed in-memory model (`apply.condense_model`). Returns (new model, info)
    with info = {"width", "padded_neurons", "dense_layers"}. Raises `NotExpressible` when the
    config cannot express it or a written layer does not reproduce its condensed block.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = model.config
    slots = dense_slots(config)
    dtype = next(model.parameters()).dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    refs = {ref.index: ref for ref in adapter.moe_layers(model)}
    condensed = sorted(condensed_layers)
    mlps: dict[int, DenseMLPWeights] = {}
    for index in condensed:
        ref = refs[index]
        if not isinstance(ref.experts, CondensedExperts):
            raise RuntimeError(f"layer {index} is not condensed")
        mlp = _as_dtype(ref.experts.weights(), work)
        for shared in ref.shared:
            mlp = append_mlp(mlp, read_mlp(shared, slots.names, mlp.act, work))
        mlps[index] = mlp
    existing = _dense_mlp_modules(adapter, model, set(refs), slots.names)
    existing_widths = [int(getattr(module, slots.names[1]).weight.shape[0]) for _, module in existing.values()]
    width = max([m.width for m in mlps.values()] + existing_widths)
    new_config = patched_dense_config(config, slots, condensed, sorted(refs), width)
    with init_empty_weights():
        new_model = AutoModelForCausalLM.from_config(new_config, dtype=dtype)
    new_moe = {ref.index for ref in adapter.moe_layers(new_model)}
    if new_moe != set(refs) - set(condensed):
        raise NotExpressible(f"the patched config makes layers {sorted(new_moe)} MoE, expected "
                             f"{sorted(set(refs) - set(condensed))}")
    new_dense = _dense_mlp_modules(adapter, new_model, new_moe, slots.names)
    state = {k: v for k, v in model.state_dict().items()
             if not any(k.startswith(refs[i].path + ".") for i in condensed)}
    padded = 0
    for index in sorted(set(condensed) | set(existing)):
        if index not in new_dense:
            raise NotExpressible(f"layer {index} of the patched config has no {'/'.join(slots.names)} dense MLP")
        path, module = new_dense[index]
        if index in mlps:
            mlp = mlps[index]
        else:
            mlp = read_mlp(existing[index][1], slots.names, None, work)
            for key in list(state):
                if key.startswith(path + "."):
                    del state[key]
        padded += width - mlp.width
        _put_mlp(state, path, module, slots.names, pad_neurons(mlp, width), dtype)
    missing, unexpected = new_model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _is_non_persistent(new_model, k)]
    if missing or unexpected:
        raise NotExpressible(f"the dense layers do not fit the patched config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    if getattr(new_config, "tie_word_embeddings", False):
        new_model.tie_weights()  # load_state_dict(assign=True) gave the tied names separate tensors
    new_model.eval()
    for index in condensed:
        _verify_layer(refs[index], new_dense[index][1], verify_tokens, dtype)
    info = {"width": width, "padded_neurons": padded, "dense_layers": sorted(set(condensed) | set(existing)),
            "config_key": slots.key}
    return new_model, info


def _as_dtype(mlp: DenseMLPWeights, dtype: torch.dtype) -> DenseMLPWeights:
    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(dtype)

    return DenseMLPWeights(cast(mlp.gate), cast(mlp.up), cast(mlp.down), cast(mlp.gate_bias), cast(mlp.up_bias),
                           cast(mlp.down_bias), mlp.act)


def _put_mlp(state: dict[str, torch.Tensor], path: str, module: nn.Module, names: tuple[str, str, str],
             mlp: DenseMLPWeights, dtype: torch.dtype) -> None:
    """Store `mlp` under the dense module's parameter names (biases must match the module's)."""
    parts = {names[0]: (mlp.gate, mlp.gate_bias), names[1]: (mlp.up, mlp.up_bias), names[2]: (mlp.down, mlp.down_bias)}
    for name, (weight, bias) in parts.items():
        linear = getattr(module, name)
        if weight is None:
            raise NotExpressible("non-gated experts cannot be written as a gated dense MLP")
        if tuple(linear.weight.shape) != tuple(weight.shape):
            raise NotExpressible(f"{path}.{name}: shape {tuple(linear.weight.shape)} != {tuple(weight.shape)}")
        if (getattr(linear, "bias", None) is None) != (bias is None):
            raise NotExpressible(f"{path}.{name}: the dense MLP's bias layout differs from the experts'")
        state[f"{path}.{name}.weight"] = weight.to(dtype).contiguous()
        if bias is not None:
            state[f"{path}.{name}.bias"] = bias.to(dtype).contiguous()


@torch.no_grad()
def _verify_layer(ref: MoELayerRef, dense: nn.Module, tokens: int, dtype: torch.dtype) -> None:
    """The new dense MLP must reproduce the condensed block (shared experts and their gates included)."""
    hidden_size = ref.experts.up.shape[1]
    gen = torch.Generator().manual_seed(ref.index)
    x = torch.randn(1, tokens, hidden_size, generator=gen).to(dtype)  # (1, T, H)
    expected = ref.block(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    got = dense(x)
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    scale = float(expected.float().abs().max()) + 1e-6
    error = float((got.float() - expected.float()).abs().max())
    if error > tolerance * scale:
        raise NotExpressible(f"layer {ref.index}: a dense MLP cannot reproduce this block (relative error "
                             f"{error / scale:.2e}; its shared experts are gated or scaled)")



def dense_layout_problem(model: nn.Module, adapter: MoEAdapter, condensed_layers: list[int]) -> str | None:
    """Why the transformers layout cannot hold these condensed layers (cheap config-level check), or None."""
    try:
        slots = dense_slots(model.config)
        refs = [ref.index for ref in adapter.moe_layers(model)]
        patched_dense_config(model.config, slots, sorted(condensed_layers), refs, 1)
    except NotExpressible as err:
        return str(err)
    return None

