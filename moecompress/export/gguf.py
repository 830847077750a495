"""`export gguf`: a stock-layout checkpoint as one GGUF file llama.cpp runs, read a layer at a time.

The checkpoint is read with `CheckpointReader` (safetensors memory maps; FP8 blocks and MXFP4
experts dequantised tensor by tensor; transformers' key conversions), one group of tensors at
a time: the tensors outside the decoder layers, then each decoder layer. Routed experts are
taken through the adapter's canonical views (`expert_weights`: gate, up, down per expert,
whatever the stored layout) and stacked per layer into llama.cpp's `ffn_{gate,up,down}_exps`
tensors. Every other tensor is named by `gguf`'s map and reshaped by the arch's `split`.

Planning runs the same code on the reader's meta-device model (shapes only, no data), so the
header lists every tensor before the first byte is written; then each group is loaded,
encoded, written and released. Peak memory is one decoder layer (plus its stacked copy).

With a `--bits` / `--size` budget (`MixOptions`) every tensor's type is chosen first
(`gguf_mix`: a calibration pass over the unquantised model, then the program), and the
manifest, whose length the header's size depends on, records the mix and the file's bytes.
"""

from __future__ import annotations

import importlib.metadata
import math
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType, LlamaFileType
from torch import nn

from moecompress.engine.reader import CheckpointReader
from moecompress.errors import MoecompressError
from moecompress.export.gguf_allocate import GGUFAllocation, tensor_choices
from moecompress.export.gguf_budget import padded
from moecompress.export.gguf_mix import MixOptions, check_budget_early, choose_types, measure, mix_record
from moecompress.export.refusals import refuse_unexportable
from moecompress.io.gguf.arches import GGUFArch
from moecompress.io.gguf.metadata import add_provenance
from moecompress.io.gguf.names import EXPERT_PROJECTIONS, GGUFNames
from moecompress.io.gguf.tokenizer import read_vocab
from moecompress.io.gguf.types import FILE_TYPES, encode_tensor, parse_output_type, tensor_type
from moecompress.io.gguf.writer import PlannedTensor, StreamingGGUF, atomic_output_file, check_output_file
from moecompress.io.manifest import build_manifest
from moecompress.models.adapters.base import MoELayerRef
from moecompress.models.load import inspect_checkpoint
from moecompress.sizes import checkpoint_dtype

# produces (GGUF name, tensor) pairs from the reader's model: meta tensors when planning, real ones when writing
Producer = Callable[[nn.Module], Iterable[tuple[str, torch.Tensor]]]


@dataclass
class TensorGroup:
    """Module keys loaded together (outside the layers, or one decoder layer) and what is made of them."""

    keys: list[str]
    producers: list[Producer]


@dataclass
class GGUFExportResult:
    """What `export_gguf` wrote."""

    path: Path
    arch: str
    output_type: str
    tensors: int
    bytes: int
    pre_tokenizer: str
    type_counts: dict[str, int] = field(default_factory=dict)
    allocation: GGUFAllocation | None = None  # the allocated mix (`--bits` / `--size`), else None

# the file type llama.cpp records for a mix: its most common type's
MIX_FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0, GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q5_0: LlamaFileType.MOSTLY_Q5_0, GGMLQuantizationType.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0, GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
}


def _get(model: nn.Module, key: str) -> torch.Tensor:
    """A parameter or persistent buffer of the model by its module key."""
    try:
        return model.get_parameter(key)
    except AttributeError:
        return model.get_buffer(key)


def _plain(key: str, names: GGUFNames, spec: GGUFArch, config: Any) -> Producer:
    name = names.resolve(key)
    return lambda model: spec.split(name, _get(model, key).detach(), config)


def _check_expert(ref: MoELayerRef, expected: int, adapter: Any) -> None:
    if ref.num_experts != expected:
        raise MoecompressError(f"MoE layer {ref.index} has {ref.num_experts} experts but the config says {expected}; "
                               "llama.cpp needs the same expert count in every layer")
    first = adapter.expert_weights(ref, 0)
    if first.gate is None:
        raise MoecompressError("this checkpoint's experts are not gated (no gate projection); llama.cpp's arch for it "
                               "expects gated SiLU experts")
    if any(b is not None for b in (first.gate_bias, first.up_bias, first.down_bias)):
        raise MoecompressError("this checkpoint's experts have biases, which llama.cpp's arch for it does not read")


def _stacked_experts(ref: MoELayerRef, adapter: Any, names: GGUFNames) -> Producer:
    """gate (E, I, H), up (E, I, H) and down (E, H, I) of one layer, stacked in expert order."""
    targets = [names.experts(ref.experts_path, projection) for projection in EXPERT_PROJECTIONS]

    def produce(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        # one stacked projection at a time: gate (E, I, H), up (E, I, H), down (E, H, I)
        experts = [adapter.expert_weights(ref, e) for e in range(ref.num_experts)]  # views, no copy
        for target, projection in zip(targets, ("gate", "up", "down")):
            yield target, torch.stack([getattr(ex, projection) for ex in experts])

    return produce


def tensor_groups(reader: CheckpointReader, names: GGUFNames, spec: GGUFArch) -> list[TensorGroup]:
    """The groups of the export in write order: outside the layers (no tied head), then each decoder layer."""
    config, adapter, model = reader.config, reader.adapter, reader.model
    tied = bool(getattr(config, "tie_word_embeddings", False))
    outside = reader.outside_layers(include_head=not tied)
    groups = [TensorGroup(outside, [_plain(key, names, spec, config) for key in outside])]
    refs = {ref.index: ref for ref in adapter.moe_layers(model)}
    expected = adapter.num_experts(config)
    for index in range(len(adapter.decoder_layers(model))):
        keys = reader.layer_keys(index)
        ref = refs.get(index)
        producers: list[Producer]
        if ref is not None:
            _check_expert(ref, expected, adapter)
            expert_prefix = ref.experts_path + "."
            producers = [_plain(k, names, spec, config) for k in keys if not k.startswith(expert_prefix)]
            producers.append(_stacked_experts(ref, adapter, names))
        else:
            producers = [_plain(k, names, spec, config) for k in keys]
        groups.append(TensorGroup(keys, producers))
    return groups


def plan_tensors(groups: list[TensorGroup], model: nn.Module, output_type: str) -> list[PlannedTensor]:
    """Every tensor of the file with its numpy shape and stored type, from the meta-device model."""
    planned = []
    for group in groups:
        for producer in group.producers:
            for name, tensor in producer(model):
                shape = tuple(int(d) for d in tensor.shape)
                planned.append(PlannedTensor(name, shape, tensor_type(name, shape, output_type)))
    return planned


def _dtype_name(info: Any) -> str:
    dtype = checkpoint_dtype(info)
    return str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16"


def export_gguf(checkpoint: str | Path, out: str | Path, output_type: str = "auto", force: bool = False,
                progress: bool = True, mix: MixOptions | None = None) -> GGUFExportResult:
    """Write `checkpoint` (a stock-layout MoE folder, pruned uniformly or not) as the GGUF file `out`.

    output_type: f32, f16, bf16, q8_0, or auto (the checkpoint's stored dtype; for FP8 / MXFP4 the
    dtype they dequantise to). mix: allocate one type per tensor under a `--bits` / `--size` budget
    instead (`moecompress.export.gguf_mix`; output_type is then ignored). Refusals (non-uniform
    layouts, GPTQ folders, unmapped architectures, tokenizers llama.cpp cannot reproduce, budgets out
    of range) are one-line `MoecompressError`s raised before anything is written.
    """
    folder = Path(checkpoint)
    check_output_file(out, force, source=folder)
    config, spec = refuse_unexportable(folder)
    info = inspect_checkpoint(folder)
    chosen = "allocated" if mix is not None else parse_output_type(output_type, _dtype_name(info))
    vocab = read_vocab(folder, int(config.vocab_size))
    reader = CheckpointReader(folder, dtype="auto", info=info)
    names = GGUFNames(spec, int(config.num_hidden_layers))
    groups = tensor_groups(reader, names, spec)
    planned = plan_tensors(groups, reader.model, "f32" if mix is not None else chosen)
    header = _HeaderMaker(spec, config, vocab, folder, chosen, planned)
    allocation = None
    if mix is not None:
        allocation = _allocate(folder, info, names, spec, planned, mix, header, progress)
        planned = [PlannedTensor(t.name, t.shape, allocation.types[t.name]) for t in planned]
    gguf = header.build(planned, _record(allocation, mix, planned, header))
    with atomic_output_file(out, force) as tmp:
        gguf.open(tmp)
        try:
            _write_groups(gguf, reader, groups, planned, progress)
        finally:
            gguf.writer.close()
        gguf.close()
    path = Path(out)
    return GGUFExportResult(path=path, arch=spec.arch_name, output_type=chosen, tensors=len(planned),
                            bytes=path.stat().st_size, pre_tokenizer=vocab.pre, type_counts=_counts(planned),
                            allocation=allocation)


def _counts(planned: list[PlannedTensor]) -> dict[str, int]:
    return dict(Counter(tensor.qtype.name for tensor in planned))


def _file_type(planned: list[PlannedTensor], chosen: str) -> LlamaFileType:
    """general.file_type: the `--type`'s, or for a mix the type holding the most weights."""
    if chosen in FILE_TYPES:
        return FILE_TYPES[chosen]
    weights: dict[GGMLQuantizationType, int] = {}
    for tensor in planned:
        if len(tensor.shape) > 1:
            weights[tensor.qtype] = weights.get(tensor.qtype, 0) + int(math.prod(tensor.shape))
    return MIX_FILE_TYPES.get(max(weights, key=weights.__getitem__), LlamaFileType.GUESSED)


class _HeaderMaker:
    """Builds the writer (metadata, tokenizer, manifest, tensor table) of the file; sizes its header."""

    def __init__(self, spec: GGUFArch, config: Any, vocab: Any, folder: Path, chosen: str,
                 planned: list[PlannedTensor]) -> None:
        self.spec, self.config, self.vocab, self.folder, self.chosen = spec, config, vocab, folder, chosen
        self.planned = planned

    def manifest(self, planned: list[PlannedTensor], allocation: dict[str, Any] | None) -> dict[str, Any]:
        gguf: dict[str, Any] = {"arch": self.spec.arch_name, "pre_tokenizer": self.vocab.pre,
                                "tensor_types": _counts(planned), "gguf_package": importlib.metadata.version("gguf")}
        if allocation is not None:
            gguf["allocation"] = allocation
        return build_manifest("export", "gguf", {"type": self.chosen}, None, self.folder, self.config, gguf=gguf)

    def build(self, planned: list[PlannedTensor], allocation: dict[str, Any] | None) -> StreamingGGUF:
        gguf = StreamingGGUF(self.spec.arch_name)
        self.spec.add_hparams(gguf.writer, self.config)
        self.vocab.add_to(gguf.writer)
        add_provenance(gguf.writer, self.folder.resolve().name, _file_type(planned, self.chosen),
                       self.manifest(planned, allocation))
        gguf.plan(planned)
        return gguf

    def header_bytes(self, allocation: dict[str, Any] | None, planned: list[PlannedTensor] | None = None) -> int:
        """Bytes before the first tensor's data (padded to the data alignment) with this manifest entry."""
        planned = planned or self.planned
        if allocation is not None and "types" in allocation:
            planned = [PlannedTensor(t.name, t.shape, GGMLQuantizationType[allocation["types"][t.name]])
                       for t in planned]
        gguf = self.build(planned, allocation)
        with tempfile.TemporaryDirectory(prefix="moecompress-gguf-header-") as tmp:
            path = Path(tmp) / "header.gguf"
            gguf.open(path)
            size = path.stat().st_size
            gguf.writer.close()
        return padded(size)


def _allocate(folder: Path, info: Any, names: GGUFNames, spec: GGUFArch, planned: list[PlannedTensor],
              mix: MixOptions, header: _HeaderMaker, progress: bool) -> GGUFAllocation:
    """Check the budget, measure every allocated tensor on calibration data, solve the program."""
    from moecompress.io.checkpoint import folder_bytes

    shapes = [(t.name, t.shape) for t in planned]
    tied = bool(getattr(info.config, "tie_word_embeddings", False))
    input_bytes = folder_bytes(folder)
    check_budget_early(shapes, tied, mix, input_bytes)
    choices = tensor_choices(shapes, tied, mix.candidates)
    errors = measure(folder, names, spec, choices, mix, info=info, progress=progress)
    _, allocation = choose_types(shapes, tied, errors, mix, header.header_bytes, input_bytes)
    return allocation


def _record(allocation: GGUFAllocation | None, mix: MixOptions | None, planned: list[PlannedTensor],
            header: _HeaderMaker) -> dict[str, Any] | None:
    """The manifest's allocation entry, with the file size it gives (the size is in the header: found by iterating)."""
    if allocation is None or mix is None:
        return None
    file_bytes = 0
    for _ in range(4):
        record = mix_record(allocation, mix, file_bytes)
        size = header.header_bytes(record, planned) + allocation.tensor_bytes
        if size == file_bytes:
            break
        file_bytes = size
    return mix_record(allocation, mix, file_bytes)


def _write_groups(gguf: StreamingGGUF, reader: CheckpointReader, groups: list[TensorGroup],
                  planned: list[PlannedTensor], progress: bool) -> None:
    """Load each group, encode and write its tensors in the planned order, release it."""
    from tqdm import tqdm

    types = {tensor.name: tensor.qtype for tensor in planned}
    with tqdm(total=len(planned), unit="tensor", desc="export gguf", disable=not progress) as bar:
        for group in groups:
            reader.load_keys(group.keys, "cpu")
            try:
                for producer in group.producers:
                    for name, tensor in producer(reader.model):
                        gguf.write(name, encode_tensor(tensor, types[name]))
                        del tensor
                        bar.update(1)
            finally:
                reader.release_keys(group.keys)
