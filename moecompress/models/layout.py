"""Per-layer expert counts and per-expert widths: what a stock transformers config cannot say.

A stock config holds ONE routed-expert count and ONE expert width for every MoE layer.
Global (non-uniform) expert pruning keeps a different number of experts per layer, and
HEAPr-style neuron pruning keeps a different width per expert. This module performs that
surgery on a loaded model and writes and reads the result in moecompress's own documented
folder format, which `moecompress.load` opens.

In memory, surgery is done in place, per MoE layer, in terms of the adapter's state-dict names
(so it works for every adapter without architecture names here): the experts module's per-expert
tensors, the router weight and bias and the correction biases are sliced together, and the
count attributes of the block, router and experts modules (`count_attrs`, by default
num_experts / num_local_experts / n_routed_experts, plus the router Linear's out_features) are
set to the layer's new count. Per-expert widths are stored ZERO-PADDED to the layer's largest
width: every expert keeps its neurons in the first w_e slots, and the padded slots get zero
gate/up rows (and biases) and zero down columns, so they contribute exactly nothing. Memory is
therefore that of the padded widths; the saving is on disk.

Folder format ("moecompress-layout", version 1):

* `config.json`: the source config; its expert count is the LARGEST per-layer count and its
  `moecompress` entry names the layout file;
* `moecompress_layout.json` (`ExpertLayout`): per MoE layer the routed-expert count and, for
  neuron-pruned layers, every expert's width;
* `moecompress-model-XXXXX-of-YYYYY.safetensors` + `moecompress-model.safetensors.index.json`:
  the tensors under their IN-MEMORY names (fused experts, not transformers' legacy per-expert
  names). In layers with per-expert widths each per-neuron expert tensor is packed: the expert
  axis is removed and the experts are concatenated along the neuron axis, each with only its
  own w_e neurons (gate/up halves kept together), so disk holds no padding.

The weight files are deliberately NOT named `model*.safetensors`: a stock loader then fails
loudly ("no file named model.safetensors") instead of silently loading mismatched weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef
from moecompress.models.tensors import get_tensor, set_tensor

LAYOUT_FILE = "moecompress_layout.json"
LAYOUT_FORMAT = "moecompress-layout"
LAYOUT_VERSION = 1
WEIGHTS_PATTERN = "moecompress-model{suffix}.safetensors"
WEIGHTS_INDEX = "moecompress-model.safetensors.index.json"
CONFIG_KEY = "moecompress"  # config.json entry with moecompress's own settings

# Module attributes holding a layer's routed-expert count, set after slicing. An adapter may
# declare its own `count_attrs` class attribute to extend this.
DEFAULT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")
# Experts-module attributes holding the expert width, set to the layer's padded width.
WIDTH_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size")
PAD_MULTIPLE = 8  # padded widths are multiples of 8 elements (16-byte strides in bf16)


class ExpertLayout(BaseModel):
    """Routed experts per MoE layer and, optionally, each expert's intermediate width."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["moecompress-layout"] = LAYOUT_FORMAT
    version: int = LAYOUT_VERSION
    experts: dict[int, int]  # decoder index of every MoE layer -> routed experts it holds
    widths: dict[int, list[int]] = {}  # neuron-pruned MoE layers -> width of each of its experts
    padded: dict[int, int] = {}  # neuron-pruned MoE layers -> in-memory (zero-padded) width

    def padded_width(self, layer: int) -> int:
        """The in-memory width of a neuron-pruned layer's experts (>= its largest expert width)."""
        return self.padded.get(layer, max(self.widths[layer]))


def padded_width(widths: Sequence[int], original: int) -> int:
    """In-memory width for per-expert `widths`: the largest, rounded up to a multiple of PAD_MULTIPLE.

    Grouped matrix-multiply kernels need 16-byte aligned strides, so the padded width is a
    multiple of 8 (capped at the original width, which the model already runs with).
    """
    largest = max(widths)
    return min(original, -(-largest // PAD_MULTIPLE) * PAD_MULTIPLE) if largest <= original else largest


def _owner(model: nn.Module, key: str) -> nn.Module:
    prefix = key.rpartition(".")[0]
    return model.get_submodule(prefix) if prefix else model


# ---------------------------------------------------------------------------------------------
# expert counts


def count_attrs(adapter: MoEAdapter) -> tuple[str, ...]:
    """Module attributes that hold a layer's expert count for this adapter."""
    return tuple(getattr(adapter, "count_attrs", DEFAULT_COUNT_ATTRS))


def _block_modules(layer: MoELayerRef) -> list[nn.Module]:
    """The block and its submodules, excluding shared experts (never pruned)."""
    shared = {id(m) for s in layer.shared for m in s.modules()}
    return [m for m in layer.block.modules() if id(m) not in shared]


def _router_keys(adapter: MoEAdapter, layer: MoELayerRef) -> list[str]:
    keys = [f"{layer.router_path}.{adapter.router_weight_attr}"]
    if adapter.router_bias_attr is not None:
        keys.append(f"{layer.router_path}.{adapter.router_bias_attr}")
    return keys


def slice_experts_(model: nn.Module, adapter: MoEAdapter, layer: MoELayerRef, keep: Sequence[int]) -> None:
    """In place: layer keeps experts `keep` (in that order); router rows and correction biases follow."""
    old_count = layer.num_experts
    ids = torch.as_tensor(list(keep), dtype=torch.long)
    if ids.numel() == 0 or int(ids.max()) >= old_count or int(ids.min()) < 0 or len(set(ids.tolist())) != ids.numel():
        raise MoecompressError(f"layer {layer.index}: kept experts must be distinct ids in [0, {old_count})")
    for name in adapter.expert_param_names(layer):
        key = f"{layer.experts_path}.{name}"
        tensor = get_tensor(model, key)
        if tensor is not None:
            set_tensor(model, key, tensor.detach().index_select(0, ids.to(tensor.device)).contiguous())
    router_owner = None
    for key in _router_keys(adapter, layer):
        tensor = get_tensor(model, key)
        if tensor is not None:
            set_tensor(model, key, tensor.detach().index_select(0, ids.to(tensor.device)).contiguous())
            router_owner = router_owner or _owner(model, key)
    for path in adapter.correction_bias_paths:
        key = f"{layer.path}.{path}"
        tensor = get_tensor(model, key)
        if tensor is not None:
            set_tensor(model, key, tensor.detach().index_select(tensor.dim() - 1, ids.to(tensor.device)).contiguous())
    new_count = int(ids.numel())
    names = count_attrs(adapter)
    for module in _block_modules(layer):
        for attr in names:
            value = module.__dict__.get(attr)
            if isinstance(value, int) and not isinstance(value, bool) and value == old_count:
                setattr(module, attr, new_count)
    if router_owner is not None and getattr(router_owner, "out_features", None) == old_count:
        router_owner.out_features = new_count


# ---------------------------------------------------------------------------------------------
# per-expert neuron widths


def _expand_neurons(index: torch.Tensor, valid: torch.Tensor, packing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Neuron slots (E, W) -> positions along the packed axis (E, W or 2W) and their validity."""
    if packing == "concat":
        return index, valid  # the caller adds the second half
    if packing == "interleave":
        return (torch.stack([2 * index, 2 * index + 1], dim=-1).flatten(1),
                torch.stack([valid, valid], dim=-1).flatten(1))
    return index, valid


def gather_neurons(tensor: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, axis: int, packing: str) -> torch.Tensor:
    """Keep neurons index[e] (E, W) of every expert of an (E, ...) tensor along `axis`; zero invalid slots.

    packing: "concat" (gate rows then up rows along the axis), "interleave" (gate/up alternate)
    or "single".
    """
    index = index.long()
    if packing == "concat":
        half = tensor.shape[axis] // 2
        positions = torch.cat([index, index + half], dim=1)  # (E, 2W)
        mask = torch.cat([valid, valid], dim=1)
    else:
        positions, mask = _expand_neurons(index, valid, packing)
    shape = [1] * tensor.dim()
    shape[0] = positions.shape[0]
    shape[axis] = positions.shape[1]
    sizes = [positions.shape[1] if d == axis else tensor.shape[d] for d in range(tensor.dim())]
    gathered = torch.gather(tensor, axis, positions.to(tensor.device).view(shape).expand(*sizes))
    keep = mask.to(tensor.device).view(shape).expand(*sizes)
    return gathered.masked_fill(~keep, 0).contiguous()


def set_widths_(model: nn.Module, adapter: MoEAdapter, layer: MoELayerRef, neurons: Sequence[torch.Tensor],
                width: int | None = None) -> int:
    """In place: expert e of `layer` keeps neurons[e] (1-D ids), zero-padded to `width`; returns the width.

    Kept neurons take the first w_e slots of expert e in ascending id order; the other slots are
    exact zeros (zero gate/up rows and biases, zero down column). `width` defaults to
    `padded_width(widths, original width)`.
    """
    if len(neurons) != layer.num_experts:
        raise MoecompressError(f"layer {layer.index}: neuron lists for {len(neurons)} experts, layer has {layer.num_experts}")
    old_width = adapter.expert_weights(layer, 0).intermediate_size
    widths = [int(torch.as_tensor(n).numel()) for n in neurons]
    width = width if width is not None else padded_width(widths, old_width)
    if max(widths) < 1:
        raise MoecompressError(f"layer {layer.index}: every expert would keep zero neurons")
    index = torch.zeros(len(neurons), width, dtype=torch.long)
    valid = torch.zeros(len(neurons), width, dtype=torch.bool)
    for e, ids in enumerate(neurons):
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().sort().values
        if ids.numel() and (int(ids.max()) >= old_width or int(ids.min()) < 0):
            raise MoecompressError(f"layer {layer.index} expert {e}: neuron ids must be in [0, {old_width})")
        index[e, : ids.numel()] = ids
        valid[e, : ids.numel()] = True
    owners = set()
    for name, (axis, packing) in adapter._neuron_axes(layer).items():
        key = f"{layer.experts_path}.{name}"
        tensor = get_tensor(model, key)
        if tensor is None:
            continue
        set_tensor(model, key, gather_neurons(tensor.detach(), index, valid, axis, packing))
        owners.add(_owner(model, key))
    for module in owners:
        for attr in WIDTH_ATTRS:
            value = module.__dict__.get(attr)
            if isinstance(value, int) and not isinstance(value, bool) and value == old_width:
                setattr(module, attr, width)
    return width


# ---------------------------------------------------------------------------------------------
# whole-model surgery


def drop_to_layout(model: nn.Module, adapter: MoEAdapter, keep_experts: dict[int, Sequence[int]] | None = None,
                   keep_neurons: dict[int, Sequence[torch.Tensor]] | None = None) -> ExpertLayout:
    """In place: keep_experts[L] experts in layer L, then keep_neurons[L][e] neurons of its e-th kept expert.

    Works for any per-layer counts and per-expert widths; returns the `ExpertLayout` that
    describes the result (what `save_layout_checkpoint` writes and `load_layout_checkpoint` rebuilds).
    """
    keep_experts = keep_experts or {}
    keep_neurons = keep_neurons or {}
    top_k = adapter.top_k(model.config)
    for layer in adapter.moe_layers(model):
        if layer.index in keep_experts:
            if len(keep_experts[layer.index]) < layer.top_k:
                raise MoecompressError(
                    f"layer {layer.index}: cannot keep {len(keep_experts[layer.index])} experts, the router chooses top_k={top_k}"
                )
            slice_experts_(model, adapter, layer, keep_experts[layer.index])
    widths: dict[int, list[int]] = {}
    padded: dict[int, int] = {}
    for layer in adapter.moe_layers(model):
        if layer.index in keep_neurons:
            padded[layer.index] = set_widths_(model, adapter, layer, keep_neurons[layer.index])
            widths[layer.index] = [int(torch.as_tensor(n).numel()) for n in keep_neurons[layer.index]]
    experts = {layer.index: layer.num_experts for layer in adapter.moe_layers(model)}
    return ExpertLayout(experts=experts, widths=widths, padded=padded)


def apply_layout_(model: nn.Module, adapter: MoEAdapter, layout: ExpertLayout) -> None:
    """Give a freshly built (meta) model the shapes `layout` describes: first n_L experts, padded widths."""
    refs = adapter.moe_layers(model)
    missing = sorted({ref.index for ref in refs} - set(layout.experts))
    if missing or set(layout.experts) - {ref.index for ref in refs}:
        raise MoecompressError(
            f"the layout's MoE layers {sorted(layout.experts)} do not match the model's {[r.index for r in refs]}"
        )
    for ref in refs:
        count = layout.experts[ref.index]
        if count > ref.num_experts:
            raise MoecompressError(f"layout: layer {ref.index} holds {count} experts, the config only {ref.num_experts}")
        if count != ref.num_experts:
            slice_experts_(model, adapter, ref, range(count))
    for ref in adapter.moe_layers(model):
        if ref.index in layout.widths:
            width = layout.padded_width(ref.index)
            set_widths_(model, adapter, ref, [torch.arange(width)] * ref.num_experts, width=width)


# ---------------------------------------------------------------------------------------------
# packing per-expert widths for disk


def _narrow_pad(tensor: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """`tensor` zero-padded along `axis` to `size`."""
    extra = size - tensor.shape[axis]
    if extra == 0:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[axis] = extra
    return torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=axis)


def pack_neurons(tensor: torch.Tensor, widths: Sequence[int], axis: int, packing: str) -> torch.Tensor:
    """(E, ...) padded expert tensor -> experts concatenated along the neuron axis, w_e neurons each."""
    a = axis - 1  # the neuron axis once the expert axis is gone
    pieces = []
    for e, w in enumerate(widths):
        t = tensor[e]
        if packing == "concat":
            half = t.shape[a] // 2
            pieces.append(torch.cat([t.narrow(a, 0, w), t.narrow(a, half, w)], dim=a))
        elif packing == "interleave":
            pieces.append(t.narrow(a, 0, 2 * w))
        else:
            pieces.append(t.narrow(a, 0, w))
    return torch.cat(pieces, dim=a).contiguous()


def unpack_neurons(packed: torch.Tensor, widths: Sequence[int], width: int, axis: int, packing: str) -> torch.Tensor:
    """Inverse of `pack_neurons`: (E, ...) with every expert zero-padded to `width` neurons."""
    a = axis - 1
    factor = 1 if packing == "single" else 2
    pieces = torch.split(packed, [factor * w for w in widths], dim=a)
    out = []
    for piece, w in zip(pieces, widths):
        if packing == "concat":
            gate, up = torch.split(piece, [w, w], dim=a)
            out.append(torch.cat([_narrow_pad(gate, a, width), _narrow_pad(up, a, width)], dim=a))
        else:
            out.append(_narrow_pad(piece, a, factor * width))
    return torch.stack(out, dim=0)


def _packed_keys(model: nn.Module, adapter: MoEAdapter, layout: ExpertLayout) -> dict[str, tuple[int, int, str]]:
    """State-dict key -> (layer, axis, packing) of every per-neuron tensor in neuron-pruned layers."""
    out = {}
    for layer in adapter.moe_layers(model):
        if layer.index not in layout.widths:
            continue
        for name, (axis, packing) in adapter._neuron_axes(layer).items():
            key = f"{layer.experts_path}.{name}"
            if get_tensor(model, key) is not None:
                out[key] = (layer.index, axis, packing)
    return out


# ---------------------------------------------------------------------------------------------
# folder I/O


def layout_config(config: Any, adapter: MoEAdapter, layout: ExpertLayout, extra: dict[str, Any] | None = None) -> Any:
    """The config written beside a layout checkpoint: largest count, and the `moecompress` entry."""
    new = adapter.patched_config(config, num_experts=max(layout.experts.values()))
    settings = dict(getattr(new, CONFIG_KEY, None) or {})
    settings.update(extra or {})
    settings["layout"] = LAYOUT_FILE
    settings["loader"] = "moecompress.load"
    setattr(new, CONFIG_KEY, settings)
    return new


def save_layout_checkpoint(model: nn.Module, adapter: MoEAdapter, layout: ExpertLayout, folder: str | Path,
                           config: Any, max_shard_size: str = "2GB") -> Path:
    """Write `model` (after `drop_to_layout`) in the moecompress layout format into `folder`."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    for key, (layer, axis, packing) in _packed_keys(model, adapter, layout).items():
        if key in state:
            state[key] = pack_neurons(state[key], layout.widths[layer], axis, packing)
    split = split_torch_state_dict_into_shards(state, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        # one metadata key (safetensors orders a metadata map arbitrarily; the format is in the index)
        save_file({name: state[name].contiguous() for name in names}, str(out / filename), metadata={"format": "pt"})
    index = {"metadata": {"format": LAYOUT_FORMAT, "total_size": split.metadata.get("total_size")},
             "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (out / LAYOUT_FILE).write_text(layout.model_dump_json(indent=2) + "\n")
    config.save_pretrained(out)
    return out


def read_layout(folder: str | Path) -> ExpertLayout:
    """The `ExpertLayout` of a layout checkpoint folder, with a clear error when absent or invalid."""
    from pydantic import ValidationError

    path = Path(folder) / LAYOUT_FILE
    if not path.is_file():
        raise MoecompressError(f"{folder} has no {LAYOUT_FILE}; it is not a moecompress layout checkpoint")
    try:
        layout = ExpertLayout.model_validate_json(path.read_text())
    except ValidationError as err:
        raise MoecompressError(f"{path} is not a valid layout file: {err.errors()[0]['msg']}") from None
    if layout.version != LAYOUT_VERSION:
        raise MoecompressError(f"{path} has layout version {layout.version}; this moecompress reads {LAYOUT_VERSION}")
    return layout


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index_file = folder / WEIGHTS_INDEX
    if not index_file.is_file():
        raise MoecompressError(f"{folder} has no {WEIGHTS_INDEX}; the layout checkpoint is incomplete")
    files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise MoecompressError(f"{folder} is missing shard {name} named in {WEIGHTS_INDEX}")
        state.update(load_file(str(folder / name)))
    return state


def load_layout_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the model from config.json, give it the saved layout, load the tensors (strict), eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from moecompress.models.load import adapter_for, load_config

    src = Path(folder)
    config = load_config(src)
    adapter = adapter_for(config)
    layout = read_layout(src)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_layout_(model, adapter, layout)
    state = _read_weights(src)
    for key, (layer, axis, packing) in _packed_keys(model, adapter, layout).items():
        if key in state:
            state[key] = unpack_neurons(state[key], layout.widths[layer], layout.padded_width(layer), axis, packing)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    expected = dict(model.state_dict())
    for key, value in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise MoecompressError(
                f"{src}: tensor {key} has shape {tuple(value.shape)}, the layout expects {tuple(expected[key].shape)}"
            )
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise MoecompressError(f"{src}: tensors the model does not have: {', '.join(unexpected[:3])}")
    model.tie_weights()
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    still_meta += [name for name, b in model.named_buffers() if b.is_meta]
    if still_meta:
        raise MoecompressError(f"{src}: tensors missing from the checkpoint: {', '.join(still_meta[:3])}")
    return model.eval()
