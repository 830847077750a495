"""moecompress's own loader for the GPTQ checkpoints it writes.

transformers' GPTQ path (optimum + gptqmodel) loads MoE checkpoints wrongly (per-expert bits
raise size mismatches; uniform bits silently re-initialise the experts), and auto-gptq does
not import with transformers 5. This loader rebuilds the model from its config with plain
transformers classes and fills every weight from the folder:

* plain tensors by name;
* quantised maps (`quant_plan.json` says which, with their spec) from qweight / qzeros /
  scales / g_idx, dequantised with `moecompress.quant.pack`;
* routed experts, written unfused (`{experts_path}.{e}.gate_proj`, ...), into the model's
  fused expert parameters through the adapter's canonical views (any layout).

`dequantize="load"` dequantises everything once (the model then takes the float memory of
its dtype). `dequantize="use"` keeps the packed tensors in memory and dequantises at use: each
decoder layer's quantised linears (attention, shared experts, dense MLPs) just before the layer
runs, freed after it; routed experts only for the experts tokens are routed to, a group at a
time (`moecompress.quant.packed_experts`). Memory then holds about the packed model plus one
layer's dense linears and one group of experts. GPTQModel (`GPTQModel.load(path, device="cpu")`)
is the other supported loader for these folders.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef
from moecompress.models.tensors import set_tensor
from moecompress.quant.layout import from_checkpoint_halves, interleaved_gate_up
from moecompress.quant.pack import from_gptq_tensors
from moecompress.quant.packed_experts import (
    DEFAULT_PER_GROUP,
    install_packed_experts,
    release_experts,
    scratch_layers,
    supports_packed_experts,
)
from moecompress.quant.plan import EXPERT_PROJECTIONS, PLAN_FILE, QuantPlan

DEQUANTIZE_MODES = ("load", "use")


def check_dequantize_mode(value: str) -> None:
    """A one-line error unless `value` is one of `DEQUANTIZE_MODES`."""
    if value not in DEQUANTIZE_MODES:
        raise MoecompressError(f"dequantize must be one of {', '.join(DEQUANTIZE_MODES)}, got {value!r}")


class _Tensors:
    """Lazy access to every tensor of a checkpoint folder by name."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        from moecompress.models.load import weight_files

        self.handles = {}
        self.where: dict[str, Any] = {}
        self.held: dict[str, torch.Tensor] = {}  # tensors read into memory once (`hold`)
        for file in weight_files(folder):
            handle = safe_open(str(file), framework="pt")
            self.handles[file] = handle
            for name in handle.keys():
                self.where[name] = handle

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def hold(self, names: Sequence[str]) -> None:
        """Read these tensors into memory now; `get` serves them from there afterwards."""
        for name in names:
            if name not in self.held:
                self.held[name] = self.get(name)

    def get(self, name: str) -> torch.Tensor:
        held = self.held.get(name)
        if held is not None:
            return held
        try:
            return self.where[name].get_tensor(name)
        except KeyError:
            raise MoecompressError(f"tensor {name!r} is missing from the checkpoint; the folder is incomplete") from None


def _read_plan(folder: Path) -> QuantPlan:
    path = folder / PLAN_FILE
    if not path.is_file():
        raise MoecompressError(f"{folder} has no {PLAN_FILE}: it was not written by moecompress; "
                               "open other GPTQ checkpoints with GPTQModel.load")
    return QuantPlan.model_validate_json(path.read_text())


def _zero_offset(config: Any) -> int:
    qconfig = getattr(config, "quantization_config", None) or {}
    if not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict()
    fmt = qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise MoecompressError(f"checkpoint_format {fmt!r} is not a GPTQ format moecompress reads (gptq, gptq_v2)")
    return 1 if fmt == "gptq" else 0


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put a loaded tensor in place: an inference model's parameters take no gradients."""
    set_tensor(model, name, value, requires_grad=False)


def _dequantized(tensors: _Tensors, name: str, spec: Any, shape: tuple[int, int], zero_offset: int,
                 dtype: torch.dtype) -> torch.Tensor:
    parts = {key: tensors.get(f"{name}.{key}") for key in _PACKED_PARTS}
    out_features, in_features = shape
    quantized = from_gptq_tensors(parts, spec.bits, out_features, in_features, spec.sym, zero_offset)
    return quantized.dequantize(dtype)


class _LayerFiller:
    """Fills one decoder layer's quantised weights (linears and experts) from the packed tensors."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter, tensors: _Tensors, plan: QuantPlan, index: int,
                 zero_offset: int, dtype: torch.dtype) -> None:
        self.model, self.adapter, self.tensors = model, adapter, tensors
        self.zero_offset, self.dtype = zero_offset, dtype
        prefix = f"{adapter.layers_path}.{index}."
        self.linears = {name: entry for name, entry in plan.entries.items()
                        if entry.kind == "linear" and entry.spec is not None and name.startswith(prefix)}
        self.moe = next((ref for ref in adapter.moe_layers(model) if ref.index == index), None)
        self.shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in self.linears}
        self.expert_shapes: dict[str, tuple[int, ...]] = {}
        if self.moe is not None:
            # every parameter holding routed experts' weights (fused, or an adapter's own layout such as DBRX's)
            experts_module = model.get_submodule(self.moe.experts_path)
            for name in adapter.expert_weight_names(self.moe):
                self.expert_shapes[name] = tuple(experts_module.get_parameter(name).shape)
        self.plan = plan

    def owned(self) -> list[str]:
        """Full names of the tensors this filler produces."""
        names = []
        for name in self.linears:
            names.append(f"{name}.weight")
            if self.model.get_submodule(name).bias is not None:
                names.append(f"{name}.bias")
        if self.moe is not None:
            names += [f"{self.moe.experts_path}.{n}" for n in self.expert_shapes]
        return names

    def fill(self) -> None:
        """Dequantise and assign every owned tensor."""
        self.fill_linears()
        if self.moe is not None:
            self.fill_experts(self.moe, range(self.moe.num_experts))

    def fill_linears(self) -> None:
        """Dequantise and assign the layer's quantised linears (not its routed experts)."""
        for name, entry in self.linears.items():
            _set_tensor(self.model, f"{name}.weight",
                        _dequantized(self.tensors, name, entry.spec, self.shapes[name], self.zero_offset, self.dtype))
            if self.model.get_submodule(name).bias is not None:
                _set_tensor(self.model, f"{name}.bias", self.tensors.get(f"{name}.bias").to(self.dtype))

    @torch.no_grad()
    def fill_experts(self, target: MoELayerRef, experts: Sequence[int]) -> None:
        """Dequantise the layer's routed experts `experts` into local experts 0.. of `target`.

        target: this layer's own experts (all of them) or a scratch experts module of the same
        class with at least len(experts) experts (`moecompress.quant.packed_experts`).
        """
        moe = self.moe
        assert moe is not None
        module = target.experts
        for name in self.adapter.expert_weight_names(target):
            _set_tensor(module, name, torch.empty(tuple(module.get_parameter(name).shape), dtype=self.dtype))
        interleaved = interleaved_gate_up(moe)
        for local, e in enumerate(experts):
            key = f"{moe.experts_path}.{e}"
            canonical = self.adapter.expert_weights(target, local)
            views = {"gate_proj": (canonical.gate, canonical.gate_bias), "up_proj": (canonical.up, canonical.up_bias),
                     "down_proj": (canonical.down, canonical.down_bias)}
            values: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
            for proj in EXPERT_PROJECTIONS:
                weight, bias = views[proj]
                if weight is not None:
                    values[proj] = (self._expert_weight(key, proj, tuple(weight.shape)),
                                    None if bias is None else self.tensors.get(f"{key}.{proj}.bias"))
            if interleaved:
                (g, gb), (u, ub) = values["gate_proj"], values["up_proj"]
                g, u = from_checkpoint_halves(g, u)
                if gb is not None:
                    gb, ub = from_checkpoint_halves(gb, ub)
                values["gate_proj"], values["up_proj"] = (g, gb), (u, ub)
            for proj, (value, bias_value) in values.items():
                weight, bias = views[proj]
                weight.copy_(value.to(self.dtype))
                if bias is not None:
                    bias.copy_(bias_value.to(self.dtype))

    def _expert_weight(self, key: str, proj: str, shape: tuple[int, ...]) -> torch.Tensor:
        name = f"{key}.{proj}"
        if f"{name}.qweight" not in self.tensors:
            return self.tensors.get(f"{name}.weight")
        entry = self.plan.entries.get(key)
        if entry is None or entry.spec is None:
            raise MoecompressError(f"{name} is packed but the plan does not quantise it; the folder is corrupt")
        return _dequantized(self.tensors, name, entry.spec, shape, self.zero_offset, torch.float32)

    def release_linears(self) -> None:
        """Drop the layer's dequantised linears to the meta device (dequantise-at-use mode)."""
        for name in self.linears:
            module = self.model.get_submodule(name)
            for leaf in ("weight", "bias"):
                current = module._parameters.get(leaf)
                if current is not None:
                    _set_tensor(self.model, f"{name}.{leaf}", torch.empty_like(current, device="meta"))

    def release_all(self) -> None:
        """Drop every owned tensor (linears and routed experts) to the meta device."""
        self.release_linears()
        if self.moe is not None:
            release_experts(self.adapter, self.moe)

    def packed_names(self) -> list[str]:
        """The checkpoint tensors this layer dequantises from (packed parts, biases, unpacked expert weights)."""
        names = [f"{name}.{part}" for name in self.linears for part in _PACKED_PARTS]
        names += [f"{name}.bias" for name in self.linears if self.model.get_submodule(name).bias is not None]
        if self.moe is not None:
            prefix = f"{self.moe.experts_path}."
            names += [name for name in self.tensors.where if name.startswith(prefix)]
        return names


_PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def load_quantized(path: str | Path, dtype: str | torch.dtype = "float32", dequantize: str = "load",
                   experts_per_group: int = DEFAULT_PER_GROUP) -> tuple[nn.Module, MoEAdapter]:
    """Open a GPTQ folder written by moecompress as a plain transformers model (eval mode).

    dequantize: "load" (dense weights at load) or "use" (packed weights, dequantised at use; see
    the module docstring). experts_per_group: in "use" mode, the most routed experts held dense at once.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from moecompress.models.load import adapter_for, load_config, parse_dtype

    check_dequantize_mode(dequantize)
    if experts_per_group < 1:
        raise MoecompressError(f"experts_per_group must be at least 1, got {experts_per_group}")
    folder = Path(path)
    config = load_config(folder)
    plan = _read_plan(folder)
    zero_offset = _zero_offset(config)
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if torch_dtype == "auto":
        torch_dtype = torch.float32
    plain_config = copy.deepcopy(config)
    if hasattr(plain_config, "quantization_config"):
        del plain_config.quantization_config
    adapter = adapter_for(plain_config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(plain_config, dtype=torch_dtype)
    tensors = _Tensors(folder)
    fillers = [_LayerFiller(model, adapter, tensors, plan, index, zero_offset, torch_dtype)
               for index in range(len(adapter.decoder_layers(model)))]
    owned = {name for filler in fillers for name in filler.owned()}
    head = next((name for name, entry in plan.entries.items() if entry.role == "lm_head" and entry.spec), None)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in owned or (head is not None and name == f"{head}.weight"):
                continue
            if name in tensors:
                value = tensors.get(name)
                _set_tensor(model, name, value.to(torch_dtype) if value.is_floating_point() else value)
            elif tensor.is_meta and not _is_tied(model, name):
                raise MoecompressError(f"tensor {name!r} is missing from {folder}; the folder is incomplete")
        if head is not None:
            entry = plan.entries[head]
            shape = tuple(model.get_submodule(head).weight.shape)
            _set_tensor(model, f"{head}.weight", _dequantized(tensors, head, entry.spec, shape, zero_offset, torch_dtype))
    model.tie_weights()
    if dequantize == "load":
        for filler in fillers:
            filler.fill()
    else:
        _dequantize_at_use(model, adapter, plain_config, fillers, tensors, experts_per_group, torch_dtype)
    model.eval()
    return model, adapter


def _dequantize_at_use(model: nn.Module, adapter: MoEAdapter, config: Any, fillers: list[_LayerFiller],
                       tensors: _Tensors, experts_per_group: int, dtype: torch.dtype) -> None:
    """Hold the packed tensors in memory; linears dequantised per layer run, routed experts per routed group."""
    moe = [filler.moe for filler in fillers if filler.moe is not None]
    per_group = min([experts_per_group] + [ref.num_experts for ref in moe])
    packed = moe and all(supports_packed_experts(ref) for ref in moe)
    scratch = scratch_layers(adapter, config, per_group, dtype) if packed else {}
    for filler, layer in zip(fillers, adapter.decoder_layers(model)):
        tensors.hold(filler.packed_names())
        if filler.moe is not None and packed:
            install_packed_experts(adapter, filler.moe, scratch[filler.moe.index], filler.fill_experts, per_group)
            fill, release = filler.fill_linears, filler.release_linears
        else:  # experts outside transformers' experts dispatch: the whole layer dense while it runs
            fill, release = filler.fill, filler.release_all
        release()
        layer.register_forward_pre_hook(_hook(fill))
        layer.register_forward_hook(_hook(release))


def _hook(fn: Callable[[], None]) -> Callable[..., None]:
    def hook(*args: Any) -> None:
        fn()

    return hook


def _is_tied(model: nn.Module, name: str) -> bool:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return name in dict(tied)

