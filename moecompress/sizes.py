"""How big a model is, split by what each tensor does (attention, routed experts, routers, ...).

Roles come from module ownership as the adapter reports it, never from tensor names:

* routed_experts: every tensor under an MoE layer's experts module (`MoELayerRef.experts`);
* routers: every tensor under an MoE layer's router module, plus any other tensor the MoE
  block owns directly that is neither experts nor shared experts (score-correction biases,
  shared-expert gates);
* shared_experts: tensors under `MoELayerRef.shared`;
* dense_mlp: the adapter's block slot (`block_attrs`) in decoder layers that are not MoE;
* attention: the other children of a decoder layer that hold a matrix (attention, linear
  attention or SSM token mixers, with their own q/k norms);
* embeddings: the input embedding and the output head (counted once when tied);
* norms_other: everything else (layer norms, final norm, persistent buffers outside blocks).

Counts are elements of every parameter plus every persistent buffer (what a checkpoint
stores). Bytes use each tensor's dtype; on a meta-device skeleton the checkpoint's dtype can
be given instead, so `moecompress inspect` sizes a checkpoint without reading its weights.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moecompress.models.adapters.base import MoEAdapter

ROLES: tuple[str, ...] = (
    "attention",
    "routed_experts",
    "shared_experts",
    "dense_mlp",
    "routers",
    "embeddings",
    "norms_other",
)

# safetensors header dtype names -> torch dtypes (for checkpoint headers).
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class RoleSize:
    """Element and byte counts of one role."""

    params: int = 0
    bytes: int = 0


@dataclass
class SizeReport:
    """Parameter and byte counts of a model split by role (see the module docstring)."""

    roles: dict[str, RoleSize] = field(default_factory=lambda: {role: RoleSize() for role in ROLES})
    dtype: str | None = None  # dtype assumed for meta tensors, if any

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.roles.values())

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.roles.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: per-role params/bytes and totals."""
        return {
            "roles": {name: {"params": r.params, "bytes": r.bytes} for name, r in self.roles.items()},
            "total_params": self.total_params,
            "total_bytes": self.total_bytes,
            "dtype": self.dtype,
        }


def config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a config says its weights are stored in (config.dtype), or None."""
    value = getattr(config, "dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        candidate = getattr(torch, value.replace("torch.", ""), None)
        if isinstance(candidate, torch.dtype):
            return candidate
    return None


def checkpoint_dtype(info: Any) -> torch.dtype | None:
    """The floating dtype holding most elements in a checkpoint's safetensors headers.

    Reads headers only (no tensor data). Falls back to the config's dtype when the headers
    hold no floating tensors. A checkpoint stored in FP8 blocks or MXFP4 reads as the float
    dtype it dequantises to (the config's, bfloat16 by default).
    """
    from safetensors import safe_open

    stored = getattr(info, "stored_format", None)
    if stored is not None and stored.quantized:
        from moecompress.models.weight_format import dequantized_dtype

        return dequantized_dtype(info.config)

    elements: Counter[str] = Counter()
    for file in info.weight_files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                numel = 1
                for dim in tensor_slice.get_shape():
                    numel *= int(dim)
                elements[tensor_slice.get_dtype()] += numel
    for name, _ in elements.most_common():
        if name in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[name]
    return config_dtype(info.config)


def skeleton_model(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal-LM module tree for `config` on the meta device (no memory, no weights).

    Tied parameters (a head tied to the embeddings) are tied, as in a loaded model, so they
    count once. Buffers are real (small: rotary frequencies, correction biases).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.tie_weights()
    return model


def size_report(model_or_info: Any, adapter: MoEAdapter | None = None, dtype: torch.dtype | None = None) -> SizeReport:
    """Parameter and byte counts by role for a model or a `CheckpointInfo`.

    model_or_info: a loaded model (real or meta tensors), or a `CheckpointInfo` from
    `inspect_checkpoint`, in which case a meta skeleton is built and its dtype read from
    the safetensors headers (no weights are loaded).
    adapter: the model's adapter (defaults to the checkpoint's, or the registry's).
    dtype: dtype assumed for floating tensors on the meta device (bytes only).
    """
    if hasattr(model_or_info, "weight_files"):  # a CheckpointInfo
        info = model_or_info
        adapter = adapter or info.adapter
        dtype = dtype or checkpoint_dtype(info)
        model = skeleton_model(info.config, dtype)
    else:
        model = model_or_info
        if adapter is None:
            from moecompress.models.adapters import get_adapter

            adapter = get_adapter(model)
    roles = tensor_roles(model, adapter)
    report = SizeReport(dtype=None if dtype is None else str(dtype).replace("torch.", ""))
    for name, tensor in _checkpoint_tensors(model):
        entry = report.roles[roles.get(name, "norms_other")]
        entry.params += tensor.numel()
        entry.bytes += tensor.numel() * _element_size(tensor, dtype)
    return report


def tensor_roles(model: nn.Module, adapter: MoEAdapter) -> dict[str, str]:
    """Role of each parameter / persistent buffer name of `model` (see the module docstring)."""
    prefixes: list[tuple[str, str]] = []  # (module path prefix, role); longest match wins
    moe_by_index = {ref.index: ref for ref in adapter.moe_layers(model)}
    for ref in moe_by_index.values():
        prefixes.append((ref.path, "routers"))
        prefixes.append((ref.experts_path, "routed_experts"))
        prefixes.append((ref.router_path, "routers"))
        for shared in ref.shared:
            prefixes.append((ref.path + "." + _child_path(ref.block, shared), "shared_experts"))
    layers = adapter.decoder_layers(model)
    for index, layer in enumerate(layers):
        layer_path = f"{adapter.layers_path}.{index}"
        block_attrs = set(adapter.block_attrs)
        for child_name, child in layer.named_children():
            child_path = f"{layer_path}.{child_name}"
            if child_name in block_attrs:
                if index not in moe_by_index:
                    prefixes.append((child_path, "dense_mlp"))
            elif any(p.dim() >= 2 for p in child.parameters()):
                prefixes.append((child_path, "attention"))
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            prefixes.append((_child_path(model, module), "embeddings"))
    prefixes.sort(key=lambda item: len(item[0]), reverse=True)
    roles: dict[str, str] = {}
    for name, _ in _checkpoint_tensors(model):
        roles[name] = "norms_other"
        for prefix, role in prefixes:
            if name.startswith(prefix + "."):
                roles[name] = role
                break
    return roles


def _checkpoint_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters (tied ones once) and persistent buffers: what a checkpoint stores."""
    tensors = list(model.named_parameters())
    modules = dict(model.named_modules())
    for name, buffer in model.named_buffers():
        module_path, _, leaf = name.rpartition(".")
        owner = modules[module_path] if module_path else model
        if leaf not in getattr(owner, "_non_persistent_buffers_set", set()):
            tensors.append((name, buffer))
    return tensors


def _element_size(tensor: torch.Tensor, meta_dtype: torch.dtype | None) -> int:
    if tensor.is_meta and meta_dtype is not None and tensor.is_floating_point():
        return torch.empty((), dtype=meta_dtype).element_size()
    return tensor.element_size()


def _child_path(root: nn.Module, child: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is child:
            return name
    raise KeyError("module is not part of the model")


def format_bytes(count: float) -> str:
    """Human-readable byte count (binary units): 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def format_count(count: int) -> str:
    """Human-readable element count: 1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)
