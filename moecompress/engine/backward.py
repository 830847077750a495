"""The backward pass from the loss, one decoder layer at a time (gradient checkpointing per layer).

HEAPr's gradient statistic and GEMQ's Fisher-weighted errors need dLoss/d(activations) inside
every decoder layer. A whole-model backward holds every layer's weights and autograd graph at
once; this pass holds one layer:

    forward:   h_0 = embed(ids);  h_{l+1} = layer_l(h_l)          l = 0 .. L-1, keeping every h_l
    head:      g_L = dLoss/dh_L   through the model's own final norm, head and loss (per batch)
    backward:  for l = L-1 .. 0:  recompute y = layer_l(h_l) with h_l requiring grad,
               backpropagate g_{l+1} into it (the hooks a stage set on layer l see every
               gradient inside the layer), g_l = dLoss/dh_l;  free layer l

Each layer is read from the checkpoint twice (forward, then its recomputation), the head once.
The kept inputs h_l take L x (tokens x hidden) values: in memory, or in memory-mapped files
when the engine spills its cached states (`moecompress.engine.spill`). Gradients equal those
of one whole-model backward per batch: the same operations on the same inputs, with the loss
of each batch its mean next-token cross entropy (what `model(..., labels=ids).loss` gives).
Only activations get gradients; parameters are frozen inside the pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moecompress.engine.layers import LayerEngine
from moecompress.engine.spill import SpilledActivations
from moecompress.errors import MoecompressError

# layer index -> context manager active while that layer is recomputed and backpropagated
LayerHooks = Callable[[int], contextlib.AbstractContextManager]

# float32 logits (and their softmax and gradient) held at once by the head's backward: a vocabulary of 151936 over
# 8 windows of 256 tokens would take 3.7 GB in one piece, so positions go through the head a slice at a time
LOGIT_BYTES = 256 * 2**20


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Every parameter of `module` without `requires_grad` inside the block (flags restored on exit)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def replay_decoder(model: nn.Module, layers: Sequence[nn.Module], hidden: torch.Tensor, **inputs: Any) -> Any:
    """The model's own forward on `inputs` with its decoder replaced by `hidden`, the last layer's output (B, S, H).

    The first decoder layer returns `hidden`, the others pass it on; everything after the
    decoder (final norm, head, soft-capping, the loss when `labels` are given) is the model's
    code. Differentiable in `hidden`.
    """
    saved = [layer.__dict__.get("forward") for layer in layers]
    calls = {"count": 0}

    def replay(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["count"] += 1
        return hidden if calls["count"] == 1 else (args[0] if args else kwargs["hidden_states"])

    for layer in layers:
        layer.forward = replay
    try:
        return model(use_cache=False, **inputs)
    finally:
        for layer, original in zip(layers, saved):
            if original is None:
                del layer.forward
            else:
                layer.forward = original


@contextlib.contextmanager
def head_in_its_dtype(model: nn.Module) -> Iterator[None]:
    """Feed the output head its own dtype (the reader may keep it narrower than the activations)."""
    head = model.get_output_embeddings()
    handle = None
    if head is not None:
        handle = head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


class _KeptInputs:
    """Every decoder layer's input per batch, kept for the layer's recomputation."""

    def __init__(self, engine: LayerEngine) -> None:
        self.engine = engine
        self.files = SpilledActivations(engine.spill.folder.parent) if engine.spill is not None else None
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}  # (layer, batch) -> (B, S, H)

    def keep(self, index: int) -> None:
        """Keep the cached states as layer `index`'s inputs (before the layer runs)."""
        count = len(self.engine.batches)
        for slot, batch in enumerate(self.engine.batches):
            # in memory the engine replaces a batch's states by a new tensor, so the old one is kept as is;
            # spilled states live in two files per batch that later layers overwrite: copy them to files of our own
            hidden = batch.hidden if self.files is None else self.files.keep(index * count + slot, batch.hidden)
            self.inputs[(index, slot)] = hidden

    def pop(self, index: int, slot: int) -> torch.Tensor:
        """Layer `index`'s input for batch `slot`, forgotten here (its file, if any, stays until `close`)."""
        return self.inputs.pop((index, slot))

    def close(self) -> None:
        self.inputs.clear()
        if self.files is not None:
            self.files.close()


def check_backward_supported(engine: LayerEngine) -> None:
    """One-line errors for what the layer-streamed backward cannot do (before any work)."""
    adapter = engine.adapter
    if not getattr(adapter, "layerwise_supported", True):
        raise MoecompressError(f"{engine.model.config.model_type} layers pass state between layers, so the backward "
                               "pass cannot run one layer at a time; load the whole model (calibration mode "
                               "'whole-model')")


def _check_not_grouped(engine: LayerEngine, index: int) -> None:
    if engine.experts_in_groups(index):
        raise MoecompressError(f"decoder layer {index} is larger than the memory budget and is computed a group of "
                               "experts at a time, which the backward pass cannot do; raise --max-memory so one "
                               "MoE layer fits")


def stream_backward(engine: LayerEngine, batches: Sequence[tuple[str, torch.Tensor]],
                    layer_hooks: LayerHooks | None = None, before_batch: Callable[[str], None] | None = None,
                    progress: bool = True, desc: str = "gradients") -> float:
    """Backpropagate each batch's loss through the decoder one layer at a time; returns the mean batch loss.

    layer_hooks(index): a context manager entered while decoder layer `index` is recomputed and
    backpropagated, with the layer's weights loaded: hooks set on its modules or on tensors of
    its forward see the same activations and gradients as in a whole-model backward.
    before_batch(domain): called before each batch's recomputation of a layer.
    """
    check_backward_supported(engine)
    total = len(engine.layers)
    kept = _KeptInputs(engine)
    losses: list[float] = []
    try:
        with frozen_parameters(engine.model):
            engine.prepare(batches)
            for index in tqdm(range(total), desc=f"{desc} (forward)", unit="layer", disable=not progress,
                              leave=False):
                kept.keep(index)
                engine.run_layer(index)
            grads = _loss_gradients(engine, batches, losses)  # dLoss/dh_L per batch
            for index in tqdm(reversed(range(total)), total=total, desc=f"{desc} (backward)", unit="layer",
                              disable=not progress):
                grads = _layer_backward(engine, index, kept, grads, layer_hooks, before_batch)
    finally:
        kept.close()
    return sum(losses) / max(1, len(losses))


def _loss_gradients(engine: LayerEngine, batches: Sequence[tuple[str, torch.Tensor]],
                    losses: list[float]) -> list[torch.Tensor]:
    """dLoss/d(last layer's output) per batch (host memory), each batch's loss appended to `losses`.

    The loss is the batch's mean next-token cross entropy over its B x (S - 1) predicted tokens,
    as `model(..., labels=ids).loss` computes it. Everything after the decoder acts on each
    position alone, so the positions go through the model's final norm and head a slice at a
    time (at most `LOGIT_BYTES` of float32 logits), each slice's share of the loss
    backpropagated on its own: the same gradient in bounded memory.
    """
    grads = []
    model = engine.model
    # (loaded weights may come back from the checkpoint requiring grad: frozen again while they are in use)
    with engine.outside_layers_loaded(include_head=True), frozen_parameters(model), head_in_its_dtype(model), \
            torch.enable_grad():
        for (_, ids), batch in zip(batches, engine.batches):
            ids = ids.to(engine.device)  # (B, S)
            loss, grad = _sliced_loss_gradient(model, engine.layers, batch.hidden.to(engine.device), ids)
            losses.append(loss)
            grads.append(_to_host(grad, engine))
    return grads


def _sliced_loss_gradient(model: nn.Module, layers: Sequence[nn.Module], hidden: torch.Tensor,
                          ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(mean next-token loss, dLoss/d hidden (B, S, H)) for one batch, the head run on slices of positions."""
    batch, length = ids.shape
    predicted = batch * (length - 1)
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, LOGIT_BYTES // (3 * 4 * vocab * batch))  # positions per slice: logits, softmax and their gradient
    grad = torch.zeros_like(hidden)
    total = 0.0
    for start in range(0, length, step):
        end = min(length, start + step)
        targets = ids[:, start + 1 : end + 1]  # (B, n): the last position predicts nothing
        if targets.shape[1] == 0:
            continue
        part = hidden[:, start:end].detach().requires_grad_(True)  # (B, s, H)
        logits = replay_decoder(model, layers, part, input_ids=ids[:, start:end]).logits  # (B, s, V)
        used = logits[:, : targets.shape[1]].float()
        loss = nn.functional.cross_entropy(used.reshape(-1, used.shape[-1]), targets.reshape(-1),
                                           reduction="sum") / predicted
        (part_grad,) = torch.autograd.grad(loss, part)
        grad[:, start:end] = part_grad
        total += float(loss.detach())
        del logits, used, loss
    return total, grad


def _to_host(tensor: torch.Tensor, engine: LayerEngine) -> torch.Tensor:
    return tensor.detach() if engine.device.type == "cpu" else tensor.detach().to("cpu")


def _layer_backward(engine: LayerEngine, index: int, kept: _KeptInputs, grads: list[torch.Tensor],
                    layer_hooks: LayerHooks | None, before_batch: Callable[[str], None] | None) -> list[torch.Tensor]:
    """Recompute decoder layer `index` on each batch's kept input and backpropagate; returns dLoss/d(its input)."""
    new_grads = []
    with engine.layer_loaded(index) as layer, frozen_parameters(layer):  # no weight of the layer gets a gradient
        _check_not_grouped(engine, index)
        hooks = layer_hooks(index) if layer_hooks is not None else contextlib.nullcontext()
        with hooks, torch.enable_grad():
            for slot, batch in enumerate(engine.batches):
                if before_batch is not None:
                    before_batch(batch.domain)
                hidden = kept.pop(index, slot).to(engine.device).detach().requires_grad_(True)
                out = engine.layer_call(index, batch, layer, hidden=hidden)
                out = out[0] if isinstance(out, tuple) else out
                grad = grads[slot].to(engine.device, dtype=out.dtype)
                (grad_in,) = torch.autograd.grad(out, hidden, grad)
                new_grads.append(_to_host(grad_in, engine))
                grads[slot] = None  # type: ignore[call-overload]  # this batch's later gradient is no longer needed
                del out, hidden, grad
    return new_grads
