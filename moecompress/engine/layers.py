"""Run a decoder one layer at a time over cached hidden states.

The sequential pattern of GPTQ and layer-wise calibration: embed every calibration batch once,
then push all batches through decoder layer 0, then layer 1, ... keeping only the hidden
states between layers.

With a `CheckpointReader` the model is a meta-device skeleton: the embeddings (and the other
small modules outside the decoder) are filled only while the batches are embedded, and each
decoder layer only while it runs, so peak memory is one layer plus the cached activations.
Without one, the engine runs a model already in memory (the whole-model path).

Layers compute on `device`; the cached hidden states stay in host memory between layers, or
in memory-mapped files when they exceed the budget (`moecompress.engine.spill`).
A MoE layer whose weights exceed `max_layer_bytes` is loaded without its routed experts, which
are then computed a group at a time (`moecompress.engine.expert_groups`).

The keyword arguments each decoder layer receives (attention masks per layer type, rotary
position embeddings, ...) are captured from the model's own forward, run once with every
decoder layer replaced by an identity recorder (the forward stops after the last one), so
the per-architecture plumbing stays transformers' own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moecompress.engine.expert_groups import ExpertGroups, group_experts, served_in_groups, serving_groups
from moecompress.engine.memory import format_gib, return_freed_memory
from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter
from moecompress.models.adapters.instrument import is_instrumented

if TYPE_CHECKING:
    from moecompress.engine.reader import CheckpointReader
    from moecompress.engine.spill import SpilledActivations


@dataclass
class _Batch:
    domain: str
    hidden: torch.Tensor  # (B, S, H) input of the next layer to run, in host memory
    layer_kwargs: list[dict[str, Any]] = field(default_factory=list)  # per decoder layer


class _EndOfLayers(Exception):
    """Raised by the last layer's recorder: nothing after the decoder is needed to capture inputs."""


class _Recorder:
    """Stands in for a decoder layer's forward: records its inputs, returns hidden unchanged."""

    def __init__(self, store: list[tuple[tuple, dict]], last: bool) -> None:
        self.store = store
        self.last = last

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.store.append((args, kwargs))
        if self.last:
            raise _EndOfLayers
        return args[0] if args else kwargs["hidden_states"]


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor inside (tuples, lists, dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def resolve_device(name: str | torch.device | None) -> torch.device:
    """A torch device from `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available); clear errors."""
    from moecompress.errors import MoecompressError

    text = "cpu" if name is None else str(name)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise MoecompressError(f"unknown device {text!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MoecompressError(f"--device {text}: no CUDA device is available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MoecompressError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise MoecompressError(f"--device {text}: moecompress runs on cpu or cuda")
    return device


# bytes held while a layer's routed experts load, per byte of loaded experts
LOAD_FACTOR_MAPPED = 1.5  # sources are file-backed views
LOAD_FACTOR_COPIED = 2.25  # sources are dequantised copies, held beside the fused tensors they fill


def check_finite_activations(hidden: torch.Tensor, index: int, domain: str) -> None:
    """A decoder layer's output holds no NaN or Inf, else a one-line error naming the layer (nothing is written)."""
    if not bool(torch.isfinite(hidden).all()):
        raise MoecompressError(f"decoder layer {index} produced NaN or Inf activations on the {domain!r} calibration "
                               "batch; the weights overflow in this dtype (try --dtype float32) or are corrupt")


class LayerEngine:
    """Holds the cached hidden states of every calibration batch between decoder layers."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter, reader: CheckpointReader | None = None,
                 device: torch.device | str | None = None, max_layer_bytes: int | None = None,
                 spill: SpilledActivations | None = None) -> None:
        """max_layer_bytes: the most one loaded layer may take (None: no limit); larger MoE layers run in expert groups.

        spill: keep the cached hidden states in memory-mapped files (`moecompress.engine.spill`)
        instead of memory.
        """
        self.model = model
        self.spill = spill
        self.max_layer_bytes = max_layer_bytes
        self._expert_groups: dict[int, ExpertGroups] = {}  # group size -> groups (their readers are reused)
        self.adapter = adapter
        self.reader = reader
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.layers = adapter.decoder_layers(model)
        self.batches: list[_Batch] = []
        self.next_layer = 0
        self._loaded: set[int] = set()  # layers whose weights are in memory (entered `layer_loaded`)
        self._moe = {ref.index: ref for ref in adapter.moe_layers(model)}

    @classmethod
    def from_reader(cls, reader: CheckpointReader, device: torch.device | str = "cpu",
                    max_layer_bytes: int | None = None) -> LayerEngine:
        """An engine over a checkpoint read layer by layer."""
        return cls(reader.model, reader.adapter, reader=reader, device=device, max_layer_bytes=max_layer_bytes)

    def expert_grouping(self, index: int) -> tuple[list[str], ExpertGroups] | None:
        """(keys loaded as usual, expert groups) when MoE layer `index` exceeds `max_layer_bytes`, else None.

        Raises a one-line error when even the layer's other weights plus one expert exceed the budget.
        """
        ref = self._moe.get(index)
        if self.reader is None or self.max_layer_bytes is None or ref is None:
            return None
        total = self.reader.layer_bytes(index)
        # a group's fused tensors, plus the source tensors being converted into them: views of the files for
        # float checkpoints, but new memory, all held at once, when they are dequantised (FP8, MXFP4)
        factor = LOAD_FACTOR_COPIED if getattr(self.reader.files, "copies_on_read", False) else LOAD_FACTOR_MAPPED
        if factor * total <= self.max_layer_bytes:
            return None
        try:
            experts_prefix = self.reader.module_path(ref.experts) + "."
        except KeyError:
            experts_prefix = None
        keys = self.reader.layer_keys(index)
        dense = [key for key in keys if experts_prefix is None or not key.startswith(experts_prefix)]
        dense_bytes = self.reader.keys_bytes(dense)
        per_expert = int(factor * (total - dense_bytes) / ref.num_experts)
        if dense_bytes + per_expert * ref.num_experts <= self.max_layer_bytes:
            return None
        if experts_prefix is None or type(self.adapter).run_experts is not MoEAdapter.run_experts:
            raise MoecompressError(f"decoder layer {index} needs {format_gib(total)}, more than the memory budget "
                                   f"({format_gib(self.max_layer_bytes)}), and {self.model.config.model_type} "
                                   "experts cannot be computed in groups; raise --max-memory")
        if dense_bytes + per_expert > self.max_layer_bytes:
            raise MoecompressError(f"decoder layer {index} needs at least {format_gib(dense_bytes + per_expert)} "
                                   f"(its weights outside the routed experts plus one expert), more than the memory "
                                   f"budget ({format_gib(self.max_layer_bytes)}); raise --max-memory")
        size = int((self.max_layer_bytes - dense_bytes) // per_expert)
        groups = self._expert_groups.get(size)
        if groups is None:
            groups = ExpertGroups(self.reader, group_experts(ref.num_experts, size), self.device)
            self._expert_groups[size] = groups
        return dense, groups

    @contextlib.contextmanager
    def layer_loaded(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer `index` with its weights on the device inside the block (a no-op without a reader).

        Re-entrant: inside an outer `layer_loaded(index)` the layer keeps the weights it has
        (which a stage may have changed, e.g. quantised), and is released by the outer block.
        """
        layer = self.layers[index]
        if self.reader is None or index in self._loaded:
            yield layer
            return
        grouping = self.expert_grouping(index)
        self._loaded.add(index)
        try:
            if grouping is None:
                with self.reader.loaded(layer, self.device):
                    yield layer
            else:
                dense, groups = grouping
                try:
                    self.reader.load_keys(dense, self.device, where=f"decoder layer {index}")
                    with served_in_groups(self._moe[index].experts, groups):
                        yield layer
                finally:
                    self.reader.release_keys(dense)
        finally:
            self._loaded.discard(index)
            return_freed_memory()

    @contextlib.contextmanager
    def outside_layers_loaded(self, include_head: bool = False) -> Iterator[None]:
        """Every module outside the decoder layers (the output head only if asked), loaded inside the block."""
        if self.reader is None:
            yield
            return
        keys = self.reader.outside_layers(include_head=include_head)
        try:
            self.reader.load_keys(keys, self.device)
            yield
        finally:
            self.reader.release_keys(keys)
            return_freed_memory()

    @torch.no_grad()
    def prepare(self, batches: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Capture each batch's layer-0 input and the kwargs of every layer (no layer runs)."""
        records: list[list[tuple[tuple, dict]]] = [[] for _ in self.layers]
        saved = []
        for i, (layer, store) in enumerate(zip(self.layers, records)):
            saved.append(layer.__dict__.get("forward"))
            layer.forward = _Recorder(store, last=i == len(self.layers) - 1)
        try:
            with self.outside_layers_loaded():
                for domain, input_ids in batches:
                    for store in records:
                        store.clear()
                    try:
                        self.model.base_model(input_ids=input_ids.to(self.device), use_cache=False)
                    except _EndOfLayers:
                        pass
                    first_args, first_kwargs = records[0][0]
                    hidden = first_args[0] if first_args else first_kwargs["hidden_states"]
                    per_layer = []
                    for store in records:
                        args, kwargs = store[0]
                        kwargs = dict(kwargs)
                        kwargs.pop("hidden_states", None)
                        extra = args[1:]
                        if extra:
                            kwargs["__args__"] = extra
                        per_layer.append(kwargs)
                    slot = len(self.batches)
                    kept = self.spill.keep(slot, hidden) if self.spill is not None else self._to_host(hidden)
                    self.batches.append(_Batch(domain=domain, hidden=kept, layer_kwargs=per_layer))
        finally:
            for layer, original in zip(self.layers, saved):
                if original is None:
                    del layer.forward
                else:
                    layer.forward = original
        self.next_layer = 0

    def _to_host(self, hidden: torch.Tensor) -> torch.Tensor:
        """A cached copy of `hidden` in host memory (pinned when the layers run on CUDA)."""
        out = hidden.detach().to("cpu", copy=True)
        return out.pin_memory() if self.device.type == "cuda" else out

    def _keep(self, slot: int, hidden: torch.Tensor) -> torch.Tensor:
        """Batch `slot`'s new cached states: spilled to its file, else a host copy (on CPU, `hidden` itself)."""
        if self.spill is not None:
            return self.spill.keep(slot, hidden)
        return hidden if self.device.type == "cpu" else self._to_host(hidden)

    def layer_call(self, index: int, batch: _Batch, layer: nn.Module, hidden: torch.Tensor | None = None) -> Any:
        """Decoder layer `index`'s raw output for one cached batch (inputs moved to the device).

        hidden: the layer's input in place of the batch's cached states (the backward pass
        recomputes a layer on the input it kept, `moecompress.engine.backward`).

        When the reader keeps routed experts narrower than the activations, a MoE layer that no
        stage instruments computes its experts through the adapter's `run_experts`, which
        widens each expert's weights as it goes (transformers' own kernels want one dtype).
        """
        kwargs = to_device(dict(batch.layer_kwargs[index]), self.device)
        extra = kwargs.pop("__args__", ())
        source = batch.hidden if hidden is None else hidden
        with self._mixed_precision_experts(index):
            return layer(source.to(self.device, non_blocking=True), *extra, **kwargs)

    def experts_in_groups(self, index: int) -> bool:
        """Whether MoE layer `index`, as loaded now, computes its routed experts a group at a time."""
        ref = self._moe.get(index)
        return ref is not None and serving_groups(ref.experts) is not None

    @contextlib.contextmanager
    def _mixed_precision_experts(self, index: int) -> Iterator[None]:
        """MoE layers whose experts transformers' kernels cannot compute (mixed dtypes, served in groups) use `run_experts`."""
        ref = self._moe.get(index) if self.reader is not None else None
        needed = ref is not None and (self.reader.mixed_precision or serving_groups(ref.experts) is not None)
        if not needed or is_instrumented(ref.experts):
            yield
            return
        with self.adapter.instrument(self.model, {index: None}):
            yield

    @torch.no_grad()
    def run_layer(self, index: int, before_batch: Callable[[str], None] | None = None, advance: bool = True) -> None:
        """Push every cached batch through decoder layer `index` (layers must run in order).

        advance=False runs the layer for what observes it and keeps the cached states as they
        were (the layer's outputs are dropped): a second run, e.g. of the layer once changed,
        then produces the next layer's inputs.
        """
        if index != self.next_layer:
            raise RuntimeError(f"layers must run in order: expected layer {self.next_layer}, got {index}")
        with self.layer_loaded(index) as layer:
            for slot, batch in enumerate(self.batches):
                if before_batch is not None:
                    before_batch(batch.domain)
                out = self.layer_call(index, batch, layer)
                out = out[0] if isinstance(out, tuple) else out
                check_finite_activations(out, index, batch.domain)
                if advance:
                    batch.hidden = self._keep(slot, out)
                del out
        if advance:
            self.next_layer = index + 1

    def restart(self, index: int, hidden: Sequence[torch.Tensor]) -> None:
        """Make `hidden` (one (B, S, H) tensor per batch) the cached inputs of layer `index` and continue there."""
        if len(hidden) != len(self.batches):
            raise ValueError(f"restart needs one hidden state per batch ({len(self.batches)}), got {len(hidden)}")
        for slot, (batch, value) in enumerate(zip(self.batches, hidden)):
            batch.hidden = self._keep(slot, value)
        self.next_layer = index

    def layer_inputs(self) -> list[tuple[str, torch.Tensor]]:
        """(domain, (B, S, H)) inputs of the next layer to run, one per batch."""
        return [(batch.domain, batch.hidden) for batch in self.batches]


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")
