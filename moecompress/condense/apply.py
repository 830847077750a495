"""Condense MoE layers of a loaded model, and the moecompress layout for condensed checkpoints.

In memory a condensed layer is the MoE block with its routed-experts module replaced by a
`CondensedExperts` dense MLP (the block's own code still runs around it, so shared experts,
their gates and any scaling stay exactly as the architecture defines them; the router still
runs but its choice is ignored).

The moecompress layout (written when the config cannot express dense layers at the chosen
positions, see `transformers_layout.py`) is a folder with

* `config.json`: the ORIGINAL config, unchanged;
* `moecompress_layout.json`: {"format": "moecompress-condensed", "version": 1, "dtype",
  "layers": [{"layer", "block_path", "experts_path", "experts", "weights", "width",
  "hidden_size", "gated", "gate_bias", "up_bias", "down_bias"}], "weight_map": {tensor: file},
  "tied": {alias: source}};
* `condensed-0000i-of-0000n.safetensors`: the model's state dict under its in-memory names,
  with each condensed layer's experts stored as `<experts_path>.gate` (I, H), `.up` (I, H),
  `.down` (H, I) (+ `.gate_bias`, `.up_bias`, `.down_bias` when the experts have biases);
* the tokenizer, `moecompress_manifest.json` and a README.

`load_condensed(path)` opens it; plain `from_pretrained` does not (the weight files are named
so that it fails loudly rather than loading random experts).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecompress.condense.cd_moe import CondensedExperts, CondensedShape, condense_layer, experts_child_path, replace_submodule
from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import _is_non_persistent
from moecompress.io.checkpoint import cast_model
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef
from moecompress.models.tensors import set_tensor

LAYOUT_FILE = "moecompress_layout.json"
LAYOUT_FORMAT = "moecompress-condensed"
LAYOUT_VERSION = 1
WEIGHTS_PREFIX = "condensed"
DEFAULT_SHARD_BYTES = 2 * 1024**3

# Selection: decoder layer -> (expert ids, fixed weights wbar_e)
Selection = Mapping[int, tuple[Sequence[int], Sequence[float]]]


def moe_layer_map(adapter: MoEAdapter, model: nn.Module) -> dict[int, MoELayerRef]:
    """Decoder index -> MoE layer reference."""
    return {ref.index: ref for ref in adapter.moe_layers(model)}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype condensed weights are built in: float64 for float64 models, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def build_condensed_modules(model: nn.Module, adapter: MoEAdapter, selection: Selection,
                            refs: Mapping[int, MoELayerRef] | None = None) -> dict[int, CondensedExperts]:
    """One `CondensedExperts` per selected layer, in the model's dtype (built in `compute_dtype`, then cast)."""
    refs = refs if refs is not None else moe_layer_map(adapter, model)
    modules = {}
    for index, (experts, weights) in selection.items():
        if index not in refs:
            raise MoecompressError(f"layer {index} is not an MoE layer")
        ref = refs[index]
        dtype = next(ref.experts.parameters()).dtype
        mlp = condense_layer(adapter, ref, experts, weights, dtype=compute_dtype(dtype))
        modules[index] = CondensedExperts.from_weights(mlp, dtype=dtype)
    return modules


@contextlib.contextmanager
def swapped_experts(refs: Mapping[int, MoELayerRef], modules: Mapping[int, nn.Module]) -> Iterator[None]:
    """Within the context, layer L's routed-experts module is modules[L]; restored afterwards."""
    restored: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for index, module in modules.items():
            ref = refs[index]
            path = experts_child_path(ref)
            old = replace_submodule(ref.block, path, module)
            restored.append((ref.block, path, old))
        yield
    finally:
        for block, path, old in reversed(restored):
            replace_submodule(block, path, old)


def condense_model(model: nn.Module, adapter: MoEAdapter, selection: Selection) -> dict[int, CondensedExperts]:
    """Replace the routed experts of each selected layer by its condensed dense MLP, in place."""
    refs = moe_layer_map(adapter, model)
    modules = build_condensed_modules(model, adapter, selection, refs)
    for index, module in modules.items():
        replace_submodule(refs[index].block, experts_child_path(refs[index]), module)
    return modules


def condensed_layer_entries(model: nn.Module, adapter: MoEAdapter, selection: Selection) -> list[dict[str, Any]]:
    """The layout file's per-layer records for a model already condensed with `selection`."""
    entries = []
    for ref in adapter.moe_layers(model):
        if ref.index not in selection:
            continue
        module = ref.experts
        if not isinstance(module, CondensedExperts):
            raise RuntimeError(f"layer {ref.index} is not condensed")
        experts, weights = selection[ref.index]
        entries.append({
            "layer": ref.index,
            "block_path": ref.path,
            "experts_path": ref.experts_path,
            "experts": [int(e) for e in experts],
            "weights": [float(w) for w in weights],
            "width": module.width,
            "hidden_size": int(module.up.shape[1]),
            "gated": module.gate is not None,
            "gate_bias": module.gate_bias is not None,
            "up_bias": module.up_bias is not None,
            "down_bias": module.down_bias is not None,
        })
    return entries


def _persistent_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, tied aliases): parameters and persistent buffers, each storage once."""
    state = model.state_dict()
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, tied


def write_layout_weights(model: nn.Module, folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
                         ) -> tuple[dict[str, str], dict[str, str]]:
    """Save the model's state dict as `condensed-*.safetensors` shards; returns (weight_map, tied)."""
    from safetensors.torch import save_file

    tensors, tied = _persistent_state(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"{WEIGHTS_PREFIX}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    return weight_map, tied


def write_moecompress_layout(model: nn.Module, adapter: MoEAdapter, selection: Selection, tokenizer: Any | None,
                             folder: str | Path, manifest: dict[str, Any], readme: str,
                             max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a condensed in-memory model (see `condense_model`) in the moecompress layout."""
    from moecompress.io.manifest import write_manifest

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    entries = condensed_layer_entries(model, adapter, selection)
    model.config.save_pretrained(out)
    weight_map, tied = write_layout_weights(model, out, max_shard_bytes)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    layout = {"format": LAYOUT_FORMAT, "version": LAYOUT_VERSION, "dtype": dtype, "layers": entries,
              "weight_map": weight_map, "tied": tied}
    (out / LAYOUT_FILE).write_text(json.dumps(layout, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_manifest(out, manifest)
    (out / "README.md").write_text(readme.rstrip() + "\n")
    return out


def read_layout(folder: str | Path) -> dict[str, Any]:
    """The layout record of a condensed checkpoint, with a clear error when it is missing or foreign."""
    path = Path(folder) / LAYOUT_FILE
    if not path.is_file():
        raise MoecompressError(
            f"{folder} has no {LAYOUT_FILE}: it is not a checkpoint in moecompress's condensed layout")
    layout = json.loads(path.read_text())
    if layout.get("format") != LAYOUT_FORMAT or layout.get("version") != LAYOUT_VERSION:
        raise MoecompressError(f"{path} has format {layout.get('format')!r} version {layout.get('version')!r}; "
                               f"this moecompress reads {LAYOUT_FORMAT!r} version {LAYOUT_VERSION}")
    return layout


def load_condensed(path: str | Path, dtype: str | torch.dtype | None = None) -> nn.Module:
    """Open a checkpoint written in the moecompress condensed layout (eval mode, CPU).

    Builds the original architecture from `config.json` without allocating weights, puts a
    `CondensedExperts` of the recorded width at each condensed layer's experts path and loads
    the stored tensors. dtype: None keeps the stored dtype.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from moecompress.models.load import adapter_for, load_config, parse_dtype

    folder = Path(path)
    layout = read_layout(folder)
    config = load_config(folder)
    adapter = adapter_for(config)
    stored_dtype = getattr(torch, layout["dtype"])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=stored_dtype)
    refs = moe_layer_map(adapter, model)
    for entry in layout["layers"]:
        ref = refs.get(entry["layer"])
        if ref is None:
            raise MoecompressError(f"{LAYOUT_FILE}: layer {entry['layer']} is not an MoE layer of this config")
        act = adapter.expert_weights(ref, 0).act
        shape = CondensedShape(entry["width"], entry["hidden_size"], entry["gated"], entry["gate_bias"],
                               entry["up_bias"], entry["down_bias"])
        module = CondensedExperts(shape, act, dtype=stored_dtype, device="meta")
        replace_submodule(ref.block, experts_child_path(ref), module)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(layout["weight_map"].values())):
        file_path = folder / file
        if not file_path.is_file():
            raise MoecompressError(f"{file_path} is missing; the condensed checkpoint is incomplete")
        state.update(load_file(str(file_path)))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = layout.get("tied", {})
    missing = [k for k in missing if k not in tied and not _is_non_persistent(model, k)]
    if missing or unexpected:
        raise MoecompressError(f"{folder}: stored tensors do not match the condensed model "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for alias, source in tied.items():
        shared = model.get_parameter(source) if _is_parameter(model, source) else model.get_buffer(source)
        set_tensor(model, alias, shared)
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise MoecompressError(f"{folder}: tensors without stored values: {leftover[:3]}")
    if dtype is not None:
        wanted = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        if wanted != "auto":
            cast_model(model, wanted)
    model.eval()
    return model



def _is_parameter(model: nn.Module, name: str) -> bool:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    return leaf in module._parameters


