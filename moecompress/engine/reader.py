"""Read a checkpoint one module at a time into a meta-device model.

`CheckpointReader(path)` builds the model's module tree on the meta device (parameters take
no memory; small buffers such as rotary frequencies are real), maps every tensor of the
safetensors shards to the parameter it feeds (transformers' own renames and per-expert ->
fused conversions, `moecompress.models.weight_conversion`), and on request fills one module
(a decoder layer, the embeddings) with its weights on a device, then empties it again.

No offload folder, no second copy on disk, no whole model in memory: tensors are read through
memory maps (`moecompress.io.safetensors_stream.TensorFiles`), so a module costs its own
converted weights while it is loaded and nothing afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.io.safetensors_stream import TensorFiles
from moecompress.io.stored_formats import StoredTensors, open_tensors
from moecompress.models.load import CheckpointInfo, inspect_checkpoint, parse_dtype
from moecompress.models.weight_conversion import KeyMap, key_map, load_into
from moecompress.sizes import checkpoint_dtype, skeleton_model


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def resolve_dtypes(info: CheckpointInfo, dtype: str | torch.dtype, device: torch.device | str = "cpu"
                   ) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of activations and non-expert weights, dtype of routed-expert weights).

    An explicit dtype is used for both. `auto` keeps the routed experts (almost all of an MoE
    model's bytes) in the dtype the checkpoint stores; the rest computes in that dtype on CUDA
    and in float32 on the CPU, where bfloat16 and float16 matrix products are several times
    slower than float32 ones (experts are then multiplied in float32 one expert at a time).
    """
    parsed = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if parsed != "auto":
        return parsed, parsed
    stored = checkpoint_dtype(info)
    stored = stored if stored in _FLOATS else torch.bfloat16
    if torch.device(device).type == "cpu" and not info.adapter.own_expert_arithmetic:
        return torch.float32, stored
    return stored, stored


FINITE_CHUNK = 1 << 24  # elements checked at a time (isfinite's temporaries stay small for a 10 GB tensor)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf, checked a chunk at a time (bounded working memory)."""
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(FINITE_CHUNK))


class CheckpointReader:
    """A checkpoint's module tree on the meta device, filled one module at a time from its shards."""

    def __init__(self, path: str | Path, dtype: str | torch.dtype = "auto", info: CheckpointInfo | None = None,
                 files: Any = None, config: Any = None, device: torch.device | str = "cpu") -> None:
        """dtype: see `resolve_dtypes`; device: where layers will compute (it decides what `auto` means).

        files/config: read other tensors (e.g. `PrunedTensors`) for another config than the folder's.
        """
        self.info = info or inspect_checkpoint(path)
        self.adapter = self.info.adapter
        self.requested = (dtype, device)
        self.dtype, self.expert_dtype = resolve_dtypes(self.info, dtype, device)
        # FP8 blocks and MXFP4 experts are dequantised tensor by tensor as layers load (io.stored_formats)
        self.files = files if files is not None else open_tensors(self.info.weight_files, self.info.config)
        self.model = skeleton_model(config if config is not None else self.info.config, self.expert_dtype)
        if self.dtype != self.expert_dtype:
            self._declare_dense_dtype()
        self.model.eval()
        self.keys: KeyMap = key_map(self.model)
        self._meta_shapes = {name: (t.shape, t.dtype) for name, t in self.model.state_dict().items()}
        self._parameter_names = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        # module key -> disk keys that feed it (several for fused experts)
        self.sources: dict[str, list[str]] = {}
        self.unmatched: list[str] = []
        for disk_key in self.files.names():
            target = self.keys.module_key(disk_key)
            if target is None:
                self.unmatched.append(disk_key)
            else:
                self.sources.setdefault(target, []).append(disk_key)

    @property
    def config(self) -> Any:
        return self.model.config

    def with_experts(self, keep: dict[int, list[int]], config: Any) -> CheckpointReader:
        """A reader of the same checkpoint with only the `keep` experts of each MoE layer (`config` patched).

        The kept experts' tensors are served from the input's shards (no pruned copy is written).
        """
        from moecompress.io.expert_copy import PrunedTensors, check_copy

        if not isinstance(self.files, (TensorFiles, StoredTensors)):
            raise MoecompressError("internal error: experts can be dropped from a checkpoint read as stored only")
        outputs = check_copy(self.files, self.adapter, self.config, config, keep)
        dtype, device = self.requested
        return CheckpointReader(self.info.path, dtype, self.info, PrunedTensors(self.files, outputs), config, device)

    @property
    def mixed_precision(self) -> bool:
        """Whether routed experts are kept in another dtype than the activations (see `resolve_dtypes`)."""
        return self.dtype != self.expert_dtype

    def _declare_dense_dtype(self) -> None:
        """Give every floating parameter outside the routed experts the activation dtype (still on meta).

        The input embeddings and the output head keep the stored dtype too (vocabulary-sized
        tables: a lookup needs no wide arithmetic, and no streamed stage multiplies by the head
        except to quantise it, which widens it itself): the embeddings' output is widened to
        the activation dtype.
        """
        embeddings = self.model.get_input_embeddings()
        head = self.model.get_output_embeddings()
        kept = list(self.adapter.moe_layers(self.model))
        expert_params = {id(p) for ref in kept for p in ref.experts.parameters()}
        expert_params |= {id(p) for p in embeddings.parameters()}
        expert_params |= {id(p) for p in head.parameters()} if head is not None else set()
        dtype = self.dtype
        embeddings.register_forward_hook(lambda module, args, output: output.to(dtype))
        for module in self.model.modules():
            for name, param in list(module._parameters.items()):
                if param is None or id(param) in expert_params or not param.is_floating_point() \
                        or param.dtype == self.dtype:
                    continue
                module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=self.dtype, device="meta"),
                                                        requires_grad=False)
        self.model.tie_weights()

    def module_path(self, module: nn.Module) -> str:
        """The dotted path of a submodule of the model."""
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise KeyError("module is not part of the reader's model")

    def _module_keys(self, prefix: str) -> list[str]:
        """Parameters and persistent buffers under `prefix` that the checkpoint must provide."""
        head = prefix + "." if prefix else ""
        return [name for name in self._meta_shapes if name.startswith(head)]

    def load(self, module: nn.Module, device: torch.device | str = "cpu") -> None:
        """Fill `module` (part of `self.model`) with its weights from the checkpoint, on `device`."""
        prefix = self.module_path(module)
        self.load_keys(self._module_keys(prefix), device, where=prefix or "the model")

    def load_keys(self, wanted: list[str], device: torch.device | str = "cpu", where: str = "the model") -> None:
        """Fill the named parameters and buffers (module keys) from the checkpoint, on `device`."""
        tied = self._tied_sources(wanted)
        missing = [name for name in wanted if name not in self.sources and name not in tied]
        if missing:
            raise MoecompressError(f"the checkpoint has no tensor for {missing[0]} ({len(missing)} missing under "
                                   f"{where}); the checkpoint is incomplete or for another config")
        fed = [name for name in wanted if name in self.sources]
        # dequantised sources are new memory: load them one parameter at a time, so that only one
        # parameter's sources are held at once (file-backed views cost nothing and load in one call)
        batches = [[name] for name in fed] if getattr(self.files, "copies_on_read", False) else [fed]
        for names in batches:
            disk_keys = [key for name in names for key in self.sources[name]]
            tensors = {key: self.files.tensor(key) for key in dict.fromkeys(disk_keys)}
            report = load_into(self.model, tensors, self.keys, device, set(names))
            del tensors
            if report.mismatched:
                name, got, want = report.mismatched[0]
                fed = len(self.sources.get(name, ()))
                origin, cause = ((f"stacked from {fed} checkpoint tensors", "a tensor is missing or ") if fed > 1
                                 else ("in the checkpoint", ""))
                raise MoecompressError(f"tensor for {name} has shape {list(got)} {origin} but the config expects "
                                       f"{list(want)}; {cause}the checkpoint does not match its config.json")
            if report.failed:
                name, why = next(iter(report.failed.items()))
                raise MoecompressError(f"the checkpoint's tensors for {name} cannot be put together ({why}); a tensor "
                                       "has the wrong shape for config.json, or the checkpoint is for another config")
            unset = [name for name in names if name in self._parameter_names
                     and self.model.get_parameter(name).device.type == "meta"]
            if unset:
                raise MoecompressError(f"the checkpoint's tensors for {unset[0]} did not load; the checkpoint does not "
                                       "match its config.json")
            self._check_finite(names)
        for name, source in tied.items():
            self._set(name, self._materialised(source, device))

    def _check_finite(self, names: list[str]) -> None:
        """Loaded weights hold no NaN or Inf (a corrupt or badly converted checkpoint), else a one-line error."""
        for name in names:
            tensor = self.model.get_parameter(name) if name in self._parameter_names else None
            if tensor is None or not tensor.is_floating_point() or tensor.device.type == "meta":
                continue
            if not all_finite(tensor):
                bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in tensor.detach().reshape(-1).split(FINITE_CHUNK))
                raise MoecompressError(f"the checkpoint's {name} holds {bad} NaN or Inf value(s); the checkpoint is "
                                       "corrupt or was converted wrongly: re-download or re-convert it")

    def outside_layers(self, include_head: bool = True) -> list[str]:
        """Module keys outside the decoder layers (embeddings, final norm; the output head if asked)."""
        layers = self.adapter.layers_path + "."
        head = self.model.get_output_embeddings()
        head_prefix = self.module_path(head) + "." if head is not None else None
        keys = []
        for name in self._meta_shapes:
            if name.startswith(layers):
                continue
            if not include_head and head_prefix is not None and name.startswith(head_prefix):
                continue
            keys.append(name)
        return keys

    def _tied_sources(self, wanted: list[str]) -> dict[str, str]:
        """Tied parameters with no tensor of their own on disk -> the parameter they share."""
        tied: dict[str, str] = {}
        getter = getattr(self.model, "get_expanded_tied_weights_keys", None)
        mapping = getter(all_submodels=True) if callable(getter) else (getattr(self.model, "_tied_weights_keys", None) or {})
        if not isinstance(mapping, dict):
            return tied
        for target, source in mapping.items():
            if target in wanted and target not in self.sources and source in self.sources:
                tied[target] = source
        return tied

    def _materialised(self, name: str, device: torch.device | str) -> torch.Tensor:
        tensor = self.model.get_parameter(name) if "." in name else getattr(self.model, name)
        if tensor.device.type != "meta":
            return tensor
        self.load_keys([name], device)
        return self.model.get_parameter(name)

    def _set(self, name: str, value: torch.Tensor) -> None:
        module_path, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(module_path) if module_path else self.model
        if attr in owner._parameters:
            owner._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[attr] = value

    def release(self, module: nn.Module) -> None:
        """Empty `module` again: its checkpoint-backed parameters and buffers go back to the meta device."""
        self.release_keys(self._module_keys(self.module_path(module)))

    def release_keys(self, names: list[str]) -> None:
        """Put the named parameters and buffers back on the meta device (their memory is freed)."""
        for name in names:
            shape, dtype = self._meta_shapes[name]
            meta = torch.empty(shape, dtype=dtype, device="meta")
            module_path, _, attr = name.rpartition(".")
            owner = self.model.get_submodule(module_path) if module_path else self.model
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(meta, requires_grad=False)
            elif attr in owner._buffers:
                owner._buffers[attr] = meta

    @contextlib.contextmanager
    def loaded(self, module: nn.Module, device: torch.device | str = "cpu") -> Iterator[nn.Module]:
        """`module` filled with its weights inside the block, emptied after it."""
        self.load(module, device)
        try:
            yield module
        finally:
            self.release(module)

    def layer_keys(self, index: int) -> list[str]:
        """Module keys (parameters and persistent buffers) of decoder layer `index`."""
        return self._module_keys(f"{self.adapter.layers_path}.{index}")

    def keys_bytes(self, keys: list[str]) -> int:
        """Bytes the named parameters and buffers occupy once loaded in their compute dtype."""
        total = 0
        for name in keys:
            shape, dtype = self._meta_shapes[name]
            total += shape.numel() * dtype.itemsize
        return total

    def new_memory_bytes(self, keys: list[str]) -> int:
        """Bytes of the named parameters and buffers that loading makes new memory (anonymous pages).

        A tensor stored in its compute dtype loads as a view of the memory-mapped file (page
        cache, which the kernel reclaims under pressure): it costs no new memory. One that is
        dequantised (FP8 blocks, MXFP4), converted to another dtype, or fused from several disk
        tensors is a new tensor: its compute-dtype bytes.
        """
        is_quantized = getattr(self.files, "is_quantized", None)
        entries = getattr(getattr(self.files, "store", self.files), "entries", {})
        total = 0
        for name in keys:
            shape, dtype = self._meta_shapes[name]
            sources = self.sources.get(name, [])
            mapped = (len(sources) == 1 and sources[0] in entries and entries[sources[0]].dtype == dtype
                      and not (is_quantized is not None and is_quantized(sources[0])))
            if not mapped:
                total += shape.numel() * dtype.itemsize
        return total

    def layer_bytes(self, index: int) -> int:
        """Bytes one decoder layer occupies once loaded in the compute dtype."""
        return self.keys_bytes(self.layer_keys(index))
