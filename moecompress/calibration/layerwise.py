"""Run a decoder one layer at a time over cached hidden states.

The sequential pattern of GPTQ and layer-wise calibration: embed every calibration batch once,
then push all batches through decoder layer 0, then layer 1, ... keeping only the hidden
states between layers. With a streaming model (decoder layers offloaded to disk by
`load_model(..., streaming=True)`) each layer's weights are in memory only while it runs, so
peak memory is about one layer plus the cached activations.

The keyword arguments each decoder layer receives (attention masks per layer type, rotary
position embeddings, ...) are captured from the model's own forward, run once with every
decoder layer replaced by an identity recorder, so the per-architecture plumbing stays
transformers' own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moecompress.models.adapters.base import MoEAdapter


@dataclass
class _Batch:
    domain: str
    hidden: torch.Tensor  # (B, S, H) input of the next layer to run
    layer_kwargs: list[dict[str, Any]] = field(default_factory=list)  # per decoder layer


class _Recorder:
    """Stands in for a decoder layer's forward: records its inputs, returns hidden unchanged."""

    def __init__(self, store: list[tuple[tuple, dict]]) -> None:
        self.store = store

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.store.append((args, kwargs))
        return args[0] if args else kwargs["hidden_states"]


class LayerwiseRunner:
    """Holds the cached hidden states of every calibration batch between decoder layers."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.layers = adapter.decoder_layers(model)
        self.batches: list[_Batch] = []
        self.next_layer = 0

    @torch.no_grad()
    def prepare(self, batches: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Capture each batch's layer-0 input and the kwargs of every layer (no layer runs)."""
        records: list[list[tuple[tuple, dict]]] = [[] for _ in self.layers]
        saved = []
        for layer, store in zip(self.layers, records):
            saved.append(layer.__dict__.get("forward"))
            layer.forward = _Recorder(store)
        try:
            for domain, input_ids in batches:
                for store in records:
                    store.clear()
                self.model.base_model(input_ids=input_ids, use_cache=False)
                first_args, _ = records[0][0]
                hidden = first_args[0] if first_args else records[0][0][1]["hidden_states"]
                per_layer = []
                for store in records:
                    args, kwargs = store[0]
                    kwargs = dict(kwargs)
                    kwargs.pop("hidden_states", None)
                    extra = args[1:]
                    if extra:
                        kwargs["__args__"] = extra
                    per_layer.append(kwargs)
                self.batches.append(_Batch(domain=domain, hidden=hidden.detach().clone(), layer_kwargs=per_layer))
        finally:
            for layer, original in zip(self.layers, saved):
                if original is None:
                    del layer.forward
                else:
                    layer.forward = original
        self.next_layer = 0

    @torch.no_grad()
    def run_layer(self, index: int, before_batch: Callable[[str], None] | None = None) -> None:
        """Push every cached batch through decoder layer `index` (layers must run in order)."""
        if index != self.next_layer:
            raise RuntimeError(f"layers must run in order: expected layer {self.next_layer}, got {index}")
        layer = self.layers[index]
        for batch in self.batches:
            if before_batch is not None:
                before_batch(batch.domain)
            kwargs = dict(batch.layer_kwargs[index])
            extra = kwargs.pop("__args__", ())
            out = layer(batch.hidden, *extra, **kwargs)
            batch.hidden = out[0] if isinstance(out, tuple) else out
        self.next_layer = index + 1

    def restart(self, index: int, hidden: Sequence[torch.Tensor]) -> None:
        """Make `hidden` (one (B, S, H) tensor per batch) the cached inputs of layer `index` and continue there."""
        if len(hidden) != len(self.batches):
            raise ValueError(f"restart needs one hidden state per batch ({len(self.batches)}), got {len(hidden)}")
        for batch, value in zip(self.batches, hidden):
            batch.hidden = value
        self.next_layer = index

    def layer_inputs(self) -> list[tuple[str, torch.Tensor]]:
        """(domain, (B, S, H)) inputs of the next layer to run, one per batch."""
        return [(batch.domain, batch.hidden) for batch in self.batches]
