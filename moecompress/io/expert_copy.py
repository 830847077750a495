"""Write an expert-pruned checkpoint by copying the kept tensors, byte for byte, without a model.

Dropping routed experts (the same number in every MoE layer) changes no number in any kept
tensor: each output tensor is an input tensor, or rows of one. So the pruned checkpoint is
written straight from the input's safetensors shards, in their stored dtype and on-disk
names, one tensor at a time through memory maps: peak memory is the writer's queue, not the
model. For each input tensor (classified by the module key it feeds, through transformers'
own key conversions):

* an expert tensor stored per expert (`...experts.{e}.gate_proj.weight`): dropped, or kept
  and renumbered to its position among the kept experts;
* an expert tensor stored fused (`experts.gate_up_proj (E, ...)`): its kept rows along dim 0;
* the router weight and bias: kept rows along dim 0; correction biases: kept entries along
  the last dim (as `MoEAdapter.sliced_state_dict` slices them in memory);
* anything else: copied as stored.

Merged experts (`moecompress.prune.merge`) are the one exception to "byte for byte": a kept
expert stored per expert that others were merged into is written as the weighted sum of its
members' tensors, each member's neurons first aligned to the representative's (float64
arithmetic, cast to the stored dtype). The intermediate axis of each per-expert tensor is the
one of the experts' width. Merging fused expert tensors, tensors whose intermediate axis is
ambiguous (width = hidden size) or experts stored quantised (FP8, MXFP4, which need
re-quantising) raises `ExpertCopyUnsupported`, so the caller writes through the model.

A uniform neuron plan (HEAPr with every expert at the same width) keeps every expert and, of
each per-expert matrix, the kept neurons' entries along its intermediate axis (rows of gate
and up, columns of down), in ascending id order: a gathered copy whose values are the input's.
Fused expert tensors and experts stored quantised (whose blocks would be cut) raise
`ExpertCopyUnsupported`.

Before anything is written, the output's tensor names and shapes are checked against the
model the patched config declares (its meta skeleton): a layout this copy cannot express
raises `ExpertCopyUnsupported`, and the caller writes through the model instead.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecompress.io.safetensors_stream import ShardWriter, TensorEntry, TensorFiles
from moecompress.models.adapters.base import MoEAdapter
from moecompress.models.weight_conversion import KeyMap, key_map
from moecompress.sizes import skeleton_model

_PER_EXPERT = re.compile(r"(^|\.)experts\.(\d+)\.")
Merges = list[list[tuple[int, float]]]  # one merged layer: (input expert, weight) per kept expert, keep order
# files of a checkpoint folder that travel with the weights unchanged
_COPIED_FILES = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "added_tokens.json",
                 "chat_template*", "generation_config.json", "*.model", "*.tiktoken")


class ExpertCopyUnsupported(Exception):
    """This checkpoint's expert layout cannot be pruned by copying tensors (the caller falls back)."""


@dataclass
class _Output:
    name: str  # output disk key
    source: str  # input disk key
    dim: int | None = None  # slicing dim, None for a plain copy
    rows: list[int] | None = None
    mix: list[tuple[str, float, int]] | None = None  # merged tensor: (member's input disk key, weight, member id)
    axis: int | None = None  # merged tensor: its intermediate (neuron) axis, None when it has none
    alignment: _Alignment | None = None  # merged tensor: the neuron permutations of its expert's members
    neurons: torch.Tensor | None = None  # neuron plan: the expert's kept neuron ids along `axis` (ascending)

    @property
    def merged(self) -> bool:
        """Whether this output is computed from several inputs (not copied)."""
        return self.mix is not None


@dataclass
class _Alignment:
    """One merged expert's neuron alignment: every member's matrices and their intermediate axes.

    The permutation of a member (`neuron_alignment.align_neurons` on all its matrices at once) is shared by
    the expert's output tensors and computed once, when the first of them is written.
    """

    representative: int
    keys: dict[int, list[str]]  # expert -> its per-expert matrices' disk keys, gate/up first, then down
    axes: dict[str, int]  # disk key -> intermediate axis
    perms: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    def permutation(self, files: Any, expert: int) -> torch.Tensor | None:
        """Member `expert`'s neuron permutation onto the representative (None for the representative)."""
        from moecompress.models.neuron_alignment import align_neurons, neuron_features

        if expert == self.representative:
            return None
        if expert not in self.perms:
            def features(e: int) -> torch.Tensor:
                return neuron_features([files.tensor(k) for k in self.keys[e]], [self.axes[k] for k in self.keys[e]])

            self.perms[expert] = align_neurons(features(self.representative), features(expert))
        return self.perms[expert]


def supports_expert_copy(adapter: MoEAdapter) -> bool:
    """Whether the adapter slices experts the generic way (adapters that override dropping do their own)."""
    cls = type(adapter)
    return cls.sliced_state_dict is MoEAdapter.sliced_state_dict and cls.drop is MoEAdapter.drop


def _slice_dim(kind: str, shape: tuple[int, ...], num_experts: int) -> int:
    dim = 0 if kind in ("expert", "router") else len(shape) - 1
    if not shape or shape[dim] != num_experts:
        raise ExpertCopyUnsupported(f"tensor of shape {list(shape)} has no expert dimension of size {num_experts}")
    return dim


def plan_copy(files: TensorFiles, keys: KeyMap, adapter: MoEAdapter, skeleton: Any,
              keep: dict[int, Sequence[int]], merges: dict[int, Merges] | None = None,
              neurons: dict[int, list[torch.Tensor]] | None = None) -> list[_Output]:
    """Every output tensor: which input it copies and which rows it keeps.

    merges: merged layers' (member, weight) per kept expert (`PrunePlan.merges`); their expert
    tensors are aligned weighted sums of the members' instead of copies (router rows still
    follow `keep`). neurons: a uniform neuron plan's kept neuron ids per expert
    (`PrunePlan.neurons`); each per-expert matrix keeps those entries of its intermediate axis.
    """
    merges = merges or {}
    neurons = neurons or {}
    kinds: dict[str, tuple[str, int]] = {}  # module key -> (kind, layer index)
    expert_prefixes: dict[str, int] = {}
    for ref in adapter.moe_layers(skeleton):
        if ref.index not in keep:
            continue
        expert_prefixes[ref.experts_path + "."] = ref.index
        for name in adapter.expert_param_names(ref):
            kinds[f"{ref.experts_path}.{name}"] = ("expert", ref.index)
        for rel in (adapter.router_weight_attr, adapter.router_bias_attr):
            if rel is not None:
                kinds[f"{ref.router_path}.{rel}"] = ("router", ref.index)
        for path in adapter.correction_bias_paths:
            kinds[f"{ref.path}.{path}"] = ("bias", ref.index)
    num_experts = adapter.num_experts(skeleton.config)
    widths = _widths(adapter, skeleton, set(merges) | set(neurons))
    alignments = _alignments(files, keys, kinds, widths, merges, keep)
    outputs: list[_Output] = []
    for disk_key, entry in files.entries.items():
        module_key = keys.module_key(disk_key)
        if module_key is None:
            raise ExpertCopyUnsupported(f"input tensor {disk_key!r} feeds no parameter of the model")
        kind = kinds.get(module_key)
        if kind is None:
            if any(module_key.startswith(prefix) for prefix in expert_prefixes):
                raise ExpertCopyUnsupported(f"expert tensor {module_key!r} is not a declared expert parameter")
            outputs.append(_Output(disk_key, disk_key))
            continue
        what, layer = kind
        kept = list(keep[layer])
        match = _PER_EXPERT.search(disk_key) if what == "expert" else None
        layer_merges = merges.get(layer) if what == "expert" else None
        if match is not None:
            expert = int(match.group(2))
            if expert in kept:
                start, end = match.span(2)
                out = _Output(disk_key[:start] + str(kept.index(expert)) + disk_key[end:], disk_key)
                if layer_merges is not None:
                    out.mix = _members(layer_merges[kept.index(expert)], disk_key, start, end, expert)
                if out.mix is not None:
                    _check_mergeable(files, out)
                    out.axis = _intermediate_axis(disk_key, entry.shape, *widths[layer])
                    out.alignment = alignments[(layer, expert)]
                if layer in neurons:
                    _select_neurons(files, out, entry, widths[layer], neurons[layer][expert])
                outputs.append(out)
            continue
        if what == "expert" and layer in neurons:
            raise ExpertCopyUnsupported(f"{disk_key!r} stores every expert in one tensor; neuron plans of such "
                                        "layouts are written through the model")
        dim = _slice_dim(what, entry.shape, num_experts)
        _check_sliceable(files, disk_key, dim, num_experts)
        if layer_merges is not None and any(members != [(e, 1.0)] for members, e in zip(layer_merges, kept)):
            raise ExpertCopyUnsupported(f"{disk_key!r} stores every expert in one tensor; merged experts are aligned "
                                        "and written through the model")
        outputs.append(_Output(disk_key, disk_key, dim, kept))
    return outputs


def _widths(adapter: MoEAdapter, skeleton: Any, layers: set[int]) -> dict[int, tuple[int, int]]:
    """These MoE layers' (intermediate size, hidden size), from the skeleton's first expert."""
    out = {}
    for ref in adapter.moe_layers(skeleton):
        if ref.index in layers:
            first = adapter.expert_weights(ref, 0)
            out[ref.index] = (first.intermediate_size, first.down.shape[0])
    return out


def _intermediate_axis(name: str, shape: tuple[int, ...], width: int, hidden: int) -> int | None:
    """The axis of a per-expert tensor that holds the expert's neurons (None for a hidden-size bias)."""
    if width == hidden:
        raise ExpertCopyUnsupported(f"expert width equals hidden size ({width}): {name!r}'s neuron axis is ambiguous")
    axes = [axis for axis, size in enumerate(shape) if size == width]
    if len(axes) == 1:
        return axes[0]
    if not axes and len(shape) == 1 and shape[0] == hidden:
        return None
    raise ExpertCopyUnsupported(f"{name!r} (shape {list(shape)}) has no single axis of the expert width {width}")


def _alignments(files: Any, keys: KeyMap, kinds: dict[str, tuple[str, int]], widths: dict[int, tuple[int, int]],
                merges: dict[int, Merges], keep: dict[int, Sequence[int]]) -> dict[tuple[int, int], _Alignment]:
    """(layer, kept expert) -> its `_Alignment`, for every merged layer's experts stored per expert."""
    matrices: dict[tuple[int, int], list[str]] = {}
    for disk_key, entry in files.entries.items():
        kind = kinds.get(keys.module_key(disk_key) or "")
        match = _PER_EXPERT.search(disk_key)
        if kind is None or kind[0] != "expert" or kind[1] not in merges or match is None or len(entry.shape) != 2:
            continue
        matrices.setdefault((kind[1], int(match.group(2))), []).append(disk_key)
    axes = {key: _intermediate_axis(key, files.entries[key].shape, *widths[layer]) for (layer, _), names in
            matrices.items() for key in names}
    out = {}
    for layer in merges:
        per = {expert: sorted(names, key=lambda k: (axes[k] != 0, k)) for (lay, expert), names in matrices.items()
               if lay == layer}
        for expert in keep[layer]:
            out[(layer, expert)] = _Alignment(expert, per, {k: axes[k] for names in per.values() for k in names})
    return out


def _select_neurons(files: Any, out: _Output, entry: TensorEntry, widths: tuple[int, int],
                    kept: torch.Tensor) -> None:
    """Make `out` keep the neurons `kept` of its per-expert tensor (a hidden-size bias stays a plain copy)."""
    axis = _intermediate_axis(out.source, entry.shape, *widths)
    if axis is None:
        return
    if files.is_quantized(out.source):
        raise ExpertCopyUnsupported(f"{out.source!r} is stored quantised in blocks; fewer neurons are re-quantised "
                                    "through the model")
    out.axis = axis
    out.neurons = torch.as_tensor(kept, dtype=torch.long)


def _members(members: list[tuple[int, float]], disk_key: str, start: int, end: int, expert: int
             ) -> list[tuple[str, float, int]] | None:
    """(member disk key, weight, member id) of one merged per-expert tensor; None when it is the expert alone."""
    if members == [(expert, 1.0)]:
        return None
    return [(disk_key[:start] + str(j) + disk_key[end:], weight, j) for j, weight in members]


def _check_mergeable(files: Any, out: _Output) -> None:
    """Merged tensors are new values: stored-quantised inputs would need re-quantising (done through the model)."""
    for key, _, _ in out.mix or []:
        if key not in files.entries:
            raise ExpertCopyUnsupported(f"merged expert tensor {key!r} is not in the checkpoint")
        if files.is_quantized(key):
            raise ExpertCopyUnsupported(f"{key!r} is stored quantised; merged experts are re-quantised through the "
                                        "model")


def merged_tensor(files: Any, out: _Output) -> torch.Tensor:
    """A merged output tensor: sum_j w_j P_j T_j over its members (P_j: neuron alignment), in the stored dtype."""
    from moecompress.models.neuron_alignment import aligned_sum

    assert out.mix is not None and out.alignment is not None
    alignment = out.alignment
    parts = [(files.tensor(key), weight, alignment.permutation(files, expert)) for key, weight, expert in out.mix]
    return aligned_sum(parts, out.axis).to(parts[0][0].dtype).contiguous()


def _check_sliceable(files: Any, name: str, dim: int, num_experts: int) -> None:
    """A quantised tensor is sliced per expert only when every stored part has the expert dimension.

    MXFP4's fused experts do (blocks and scales both lead with E); an FP8 router's block scales
    do not (their rows are blocks of rows), so such a checkpoint is written through the model.
    """
    if not files.is_quantized(name):
        return
    for part in files.parts(name):
        shape = files.store.entries[part].shape
        if dim >= len(shape) or shape[dim] != num_experts:
            raise ExpertCopyUnsupported(f"{part!r} (shape {list(shape)}) is stored quantised in blocks that mix "
                                        "experts")


def _output_shape(entry: TensorEntry, out: _Output) -> tuple[int, ...]:
    if out.neurons is not None and out.axis is not None:
        shape = list(entry.shape)
        shape[out.axis] = int(out.neurons.numel())
        return tuple(shape)
    if out.dim is None:
        return entry.shape
    shape = list(entry.shape)
    shape[out.dim] = len(out.rows or [])
    return tuple(shape)


def check_against_config(outputs: list[_Output], files: TensorFiles, config: Any) -> None:
    """The output's tensors feed exactly the parameters of the model `config` declares, with their shapes."""
    skeleton = skeleton_model(config)
    keys = key_map(skeleton)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    fed: dict[str, list[tuple[int, ...]]] = {}
    stacked: set[str] = set()  # parameters fed expert by expert (one source each, stacked by the conversion)
    for out in outputs:
        module_key = keys.module_key(out.name)
        if module_key is None:
            raise ExpertCopyUnsupported(f"output tensor {out.name!r} would feed no parameter of the pruned model")
        fed.setdefault(module_key, []).append(_output_shape(files.entries[out.source], out))
        if _PER_EXPERT.search(out.name):
            stacked.add(module_key)
    tied = getattr(skeleton, "_tied_weights_keys", None) or {}
    tied_targets = set(tied) if isinstance(tied, dict) else set()
    missing = [name for name in expected if name not in fed and name not in tied_targets]
    if missing:
        raise ExpertCopyUnsupported(f"the pruned model's {missing[0]} would have no tensor")
    for name, shapes in fed.items():
        if len(shapes) == 1 and name not in stacked and shapes[0] != expected[name]:
            raise ExpertCopyUnsupported(f"{name}: shape {list(shapes[0])} but the pruned config expects "
                                        f"{list(expected[name])}")


class PrunedTensors:
    """The tensors of an expert-pruned checkpoint, served from the input's shards without writing them.

    Quacks like `TensorFiles` for `CheckpointReader`: `names()`, `entries` and `tensor(name)`.
    """

    def __init__(self, files: TensorFiles, outputs: list[_Output]) -> None:
        self.files = files
        self.outputs = {out.name: out for out in outputs}
        self.entries = {out.name: dataclasses.replace(files.entries[out.source], name=out.name,
                                                      shape=_output_shape(files.entries[out.source], out))
                        for out in outputs}

    def names(self) -> list[str]:
        """Every tensor name of the pruned checkpoint."""
        return list(self.outputs)

    @property
    def copies_on_read(self) -> bool:
        """Whether the tensors served are new memory (as the input's are)."""
        return bool(getattr(self.files, "copies_on_read", False))

    def tensor(self, name: str) -> torch.Tensor:
        """A kept tensor: the input's (zero-copy), its kept rows (a copy of those rows), or a merged one."""
        out = self.outputs[name]
        if out.merged:
            return merged_tensor(self.files, out)
        tensor = self.files.tensor(out.source)
        if out.neurons is not None:
            return tensor.index_select(out.axis, out.neurons)
        if out.dim is None:
            return tensor
        return tensor.index_select(out.dim, torch.as_tensor(out.rows or [], dtype=torch.long))


def _rows_bytes(store: TensorFiles, entry: TensorEntry, out: _Output) -> list[memoryview] | torch.Tensor:
    """Kept rows of a stored tensor: byte ranges of the input when slicing dim 0, else a small gathered copy."""
    rows = out.rows or []
    if out.dim == 0:
        raw = store.raw(entry.name)
        stride = entry.nbytes // entry.shape[0]
        return [raw[r * stride:(r + 1) * stride] for r in rows]
    tensor = store.tensor(entry.name)
    return tensor.index_select(out.dim or 0, torch.as_tensor(rows, dtype=torch.long)).contiguous()


def write_expert_copy(files: Any, outputs: list[_Output], folder: Path, max_shard_bytes: int | str,
                      progress: bool = True) -> int:
    """Write the planned tensors into safetensors shards in `folder`; returns bytes written.

    files: `TensorFiles`, or a `StoredTensors` view of an FP8 / MXFP4 checkpoint, whose tensors
    are copied part by part in their stored format (weight and scales, blocks and scales).
    """
    from tqdm.auto import tqdm

    store = files.store
    writer = ShardWriter(folder, max_shard_bytes)
    for out in tqdm(outputs, desc="copying kept tensors", unit="tensor", disable=not progress, mininterval=1.0):
        if out.merged:
            writer.add(out.name, merged_tensor(files, out))
            continue
        if out.neurons is not None:  # the expert's kept neurons: a gathered copy, values unchanged
            writer.add(out.name, files.tensor(out.source).index_select(out.axis, out.neurons).contiguous())
            continue
        for part in files.parts(out.source):
            name = out.name + part[len(out.source):]  # each part is the logical name plus a suffix
            entry = store.entries[part]
            if out.dim is None:
                writer.add_raw(name, entry.dtype, entry.shape, store.raw(part))
                continue
            data = _rows_bytes(store, entry, out)
            if isinstance(data, torch.Tensor):
                writer.add(name, data)
            else:
                writer.add_raw(name, entry.dtype, _output_shape(entry, out), data)
    writer.finish()
    return writer.total_bytes


def copy_side_files(source: Path, folder: Path) -> None:
    """Copy the tokenizer and generation files of the input folder unchanged."""
    seen: set[Path] = set()
    for pattern in _COPIED_FILES:
        for path in sorted(source.glob(pattern)):
            if path.is_file() and path not in seen:
                seen.add(path)
                shutil.copy2(path, folder / path.name)


def check_copy(files: TensorFiles, adapter: MoEAdapter, config: Any, new_config: Any,
               keep: dict[int, Sequence[int]], merges: dict[int, Merges] | None = None,
               neurons: dict[int, list[torch.Tensor]] | None = None) -> list[_Output]:
    """The planned output tensors, checked against `new_config`; `ExpertCopyUnsupported` when they cannot be.

    merges: merged layers' (member, weight) per kept expert; neurons: a uniform neuron plan's
    kept neuron ids per expert (see `plan_copy`).
    """
    if not supports_expert_copy(adapter):
        raise ExpertCopyUnsupported(f"{config.model_type} drops experts with its own adapter code")
    skeleton = skeleton_model(config)
    outputs = plan_copy(files, key_map(skeleton), adapter, skeleton, keep, merges, neurons)
    check_against_config(outputs, files, new_config)
    return outputs


def prune_by_copy(source: Path, files: TensorFiles, outputs: list[_Output], new_config: Any, folder: Path,
                  max_shard_bytes: int | str = "5GB", progress: bool = True) -> int:
    """Write the checked output tensors, the config and the side files into `folder`; returns weight bytes."""
    written = write_expert_copy(files, outputs, folder, max_shard_bytes, progress)
    new_config.save_pretrained(folder)
    copy_side_files(source, folder)
    return written
