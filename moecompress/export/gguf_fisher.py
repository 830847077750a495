"""Fisher-weighted errors of each candidate GGML type: `export gguf --sensitivity fisher`.

The output-error measure (`gguf_sensitivity`) weighs every tensor's output error alike, so an
error in a layer the loss barely feels costs as much as one in a layer it feels strongly. This
measure weighs each output by the loss's squared gradient there (the diagonal empirical Fisher,
GEMQ's weighting, applied per GGUF tensor). For a tensor W (rows, in), y_t = W x_t:

    err(W, t) = sum_t sum_r F_{t,r} ((W - Q_t(W)) x_t)_r^2,        F_{t,r} = (dLoss/dy_{t,r})^2

held in one input moment per tensor (an `InputMoment`: the weighted input rows, or the (in, in)
matrix once there are more rows than twice the width) through the separable approximation F_{t,r} ~ c_t w_r / S
(c_t = sum_r F_{t,r}, w_r = sum_t F_{t,r}, S = sum_{t,r} F_{t,r}; exact when F has rank one):

    err ~ sum_r (w_r / S) D_r H_c D_r^T,      D = W - Q_t(W),   H_c = sum_t c_t x_t x_t^T

* attention, shared-expert and dense-MLP linears: x_t the linear's input, dLoss/dy its output's
  gradient, both seen while the layer-streamed backward (`moecompress.engine.backward`)
  recomputes the layer;
* routed experts, per expert e over its routed tokens: the MoE block's output gradient G_t times
  the routing weight g_{e,t} is dLoss/d(expert output); the expert is recomputed on the recorded
  block inputs with autograd to give dLoss/d(gate output) and dLoss/d(up output); down's input is
  the expert's activation. The stacked tensor's error is the sum over experts;
* the token embedding (a lookup): err = sum_v sum_h F0_{v,h} (E_v - Q_t(E)_v)_h^2 with F0_v the sum
  of (dLoss/dh_0)^2 over the calibration positions holding token v (h_0, the first decoder layer's
  input, is the looked-up row for the architectures `export gguf` writes).

The loss is each calibration batch's mean next-token cross entropy; the model runs on the
unquantised float32 weights one decoder layer at a time (forward, then the backward that
recomputes each layer from its kept input), on `request.device`; the sums accumulate there in
float64 and the types' round trips through `gguf.quants` run on the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moecompress.engine.backward import stream_backward
from moecompress.engine.layers import LayerEngine, resolve_device
from moecompress.engine.reader import CheckpointReader
from moecompress.export.gguf_moments import InputMoment, moment_bytes
from moecompress.export.gguf_sensitivity import (
    TRANSPOSED,
    SensitivityRequest,
    TypeErrors,
    busiest_expert_rows,
    embedding_table,
    expert_targets,
    layer_linears,
    roundtrip,
)
from moecompress.io.gguf.arches import GGUFArch
from moecompress.io.gguf.names import EXPERT_PROJECTIONS, GGUFNames
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef
from moecompress.quant.layer_pass import expert_chunks, visit_recorded


class FisherMoment:
    """H_c = sum_t c_t x_t x_t^T (an `InputMoment`) and w = sum_t F_t (rows,) of one map, float64 (module docstring)."""

    def __init__(self, width: int, rows: int) -> None:
        self.inputs = InputMoment(width)
        self.rows = torch.zeros(rows, dtype=torch.float64)

    @property
    def width(self) -> int:
        """The map's input width."""
        return self.inputs.width

    def add(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Inputs x (..., in) and the loss's gradient at the outputs (..., rows) of the same positions."""
        fisher = grad.detach().reshape(-1, self.rows.shape[0]).double() ** 2  # (N, rows)
        if self.rows.device != fisher.device:  # the first inputs decide where the sums live (--device)
            self.rows = self.rows.to(fisher.device)
        self.rows += fisher.sum(0)
        self.inputs.add(x, fisher.sum(1))  # c_t = sum_r F_{t,r}

    def error(self, delta: np.ndarray, row_weights: np.ndarray | None = None) -> float:
        """sum_r (w_r / S) D_r H_c D_r^T for D (R, in); `row_weights` (R,): w laid out as D's rows (default: w)."""
        rows = self.rows.cpu().numpy()
        weights = rows if row_weights is None else row_weights
        total = float(rows.sum())
        if total <= 0.0:
            return 0.0
        return float(self.inputs.row_forms(delta) @ weights) / total


def _delta(array: np.ndarray, qtype: Any) -> np.ndarray:
    return (array - roundtrip(array, qtype)).astype(np.float64)


def _split_errors(linears: dict[str, tuple[nn.Linear, str]], moments: dict[str, FisherMoment], names: GGUFNames,
                  spec: GGUFArch, config: Any, request: SensitivityRequest, errors: TypeErrors) -> None:
    """Each measured linear's GGUF tensors at every candidate type, the row weights split as the rows are."""
    for path, (module, key) in linears.items():
        moment = moments[path]
        width = moment.width
        weight = module.weight.detach().float().cpu()  # (rows, in)
        # w laid out like the weight, so the arch's split (row permutations, MLA's kv_b split) moves it with its rows
        spread = moment.rows.float().cpu()[:, None].expand_as(weight).contiguous()
        parts = dict(spec.split(names.resolve(key), spread, config))
        for name, tensor in spec.split(names.resolve(key), weight, config):
            if name not in request.wanted:
                continue
            array = tensor.contiguous().numpy()
            spread_part = parts[name].contiguous().numpy().astype(np.float64)
            transposed = name.split(".")[-2] in TRANSPOSED or array.shape[-1] != width
            errors[name] = {}
            for t in request.wanted[name]:
                delta = _delta(array, t)
                rows = spread_part
                if transposed:  # stored (..., in, rows): put the error's axes back in the linear's order
                    delta, rows = np.swapaxes(delta, -1, -2), np.swapaxes(rows, -1, -2)
                errors[name][t.name] = moment.error(delta.reshape(-1, width), rows.reshape(-1, width)[:, 0])


class _ExpertFisher:
    """A visitor over recorded tokens: per expert, the Fisher moments of gate, up (inputs x) and down (activations)."""

    def __init__(self, adapter: MoEAdapter, ref: MoELayerRef, experts: list[int]) -> None:
        self.adapter, self.ref = adapter, ref
        probe = adapter.expert_weights(ref, experts[0])
        hidden, intermediate = probe.up.shape[1], probe.up.shape[0]
        self.moments = {e: {"gate": FisherMoment(hidden, intermediate) if probe.gate is not None else None,
                            "up": FisherMoment(hidden, intermediate),
                            "down": FisherMoment(intermediate, hidden)} for e in experts}
        self.block_grad: torch.Tensor | None = None  # dLoss/d(block output) of the batch being visited (T, H)

    def __call__(self, expert: int, token_idx: torch.Tensor, slot: torch.Tensor, x: torch.Tensor,
                 act: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> None:
        if expert not in self.moments or self.block_grad is None or token_idx.numel() == 0:
            return
        weights = self.adapter.expert_weights(self.ref, expert)
        grad_out = gate.detach().float()[:, None] * self.block_grad[token_idx]  # dLoss/d(expert output) (N, H)
        x = x.detach().float()
        with torch.enable_grad():
            up = nn.functional.linear(x, weights.up.detach().float(),
                                      None if weights.up_bias is None else weights.up_bias.detach().float())
            up.requires_grad_(True)
            pre_gate = None
            if weights.gate is not None:
                pre_gate = nn.functional.linear(x, weights.gate.detach().float(),
                                                None if weights.gate_bias is None else weights.gate_bias.detach().float())
                pre_gate.requires_grad_(True)
            assert weights.act is not None
            activation = weights.act(pre_gate, up)  # (N, I)
            down = nn.functional.linear(activation, weights.down.detach().float())  # bias: no gradient to it
            wrt = [up] if pre_gate is None else [up, pre_gate]
            grads = torch.autograd.grad(down, wrt, grad_out)
        moments = self.moments[expert]
        moments["up"].add(x, grads[0])
        if pre_gate is not None:
            moments["gate"].add(x, grads[1])
        moments["down"].add(activation.detach(), grad_out)


@contextlib.contextmanager
def _layer_recorder(adapter: MoEAdapter, ref: MoELayerRef | None, linears: dict[str, tuple[nn.Linear, str]],
                    moments: dict[str, FisherMoment], recorded: list) -> Iterator[None]:
    """While a layer is recomputed and backpropagated: every measured linear's moments, and the MoE block's
    inputs, routing and output gradient appended to `recorded` as [flat input (T, H), routing, G (T, H) or None]."""
    handles = []

    def linear_hook(module: nn.Module, args: tuple, output: torch.Tensor, _m: FisherMoment) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            x = args[0].detach()
            output.register_hook(lambda grad: _m.add(x, grad))

    def block_hook(module: nn.Module, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        flat = args[0].detach().reshape(-1, args[0].shape[-1])  # (T, H)
        with torch.no_grad():
            entry: list = [flat, adapter.route(ref, flat), None]
        recorded.append(entry)

        def on_grad(grad: torch.Tensor) -> None:
            entry[2] = grad.detach().reshape(-1, grad.shape[-1]).float()

        out.register_hook(on_grad)

    try:
        for path, (module, _) in linears.items():
            handles.append(module.register_forward_hook(
                lambda mod, args, output, _m=moments[path]: linear_hook(mod, args, output, _m)))
        if ref is not None:
            handles.append(ref.block.register_forward_hook(block_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _expert_errors(adapter: MoEAdapter, ref: MoELayerRef, recorded: list, names: GGUFNames,
                   request: SensitivityRequest, errors: TypeErrors) -> None:
    """Sum over experts of the Fisher-weighted errors of the layer's stacked gate, up and down."""
    hidden, intermediate, targets = expert_targets(adapter, ref, names, request, errors)
    kept = [(flat, routed, grad) for flat, routed, grad in recorded if grad is not None]
    rows = busiest_expert_rows([routed for _, routed, _ in kept], ref.num_experts)
    per_expert = 2 * moment_bytes(hidden, rows) + moment_bytes(intermediate, rows) + 8 * (2 * intermediate + hidden)
    for chunk in expert_chunks(range(ref.num_experts), per_expert, request.expert_memory):
        visitor = _ExpertFisher(adapter, ref, list(chunk))
        for flat, routed, grad in kept:
            visitor.block_grad = grad
            visit_recorded(adapter, ref, [(flat, routed)], visitor, chunk)
        for e in chunk:
            expert = adapter.expert_weights(ref, e)
            for proj, attr in zip(EXPERT_PROJECTIONS, ("gate", "up", "down")):
                name, moment = targets[proj], visitor.moments[e][attr]
                if name not in request.wanted or moment is None:
                    continue
                weight = getattr(expert, attr).detach().float().cpu().contiguous().numpy()  # (rows, in)
                for t in request.wanted[name]:
                    errors[name][t.name] += moment.error(_delta(weight, t))


class _EmbeddingFisher:
    """F0 (U, H): per token id used in calibration, the summed squared gradient at the first layer's input."""

    def __init__(self, batches: list[tuple[str, torch.Tensor]], hidden: int) -> None:
        self.ids = [ids.reshape(-1) for _, ids in batches]
        self.used = torch.unique(torch.cat(self.ids))  # (U,) sorted
        self.fisher = torch.zeros(len(self.used), hidden, dtype=torch.float64)
        self.next_batch = 0

    @contextlib.contextmanager
    def hooked(self, layer: nn.Module) -> Iterator[None]:
        """Within the block, each recomputation of `layer` (batch 0, 1, ... in order) adds its input's gradient."""

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if not hidden.requires_grad:
                return
            slot = self.next_batch
            self.next_batch += 1
            hidden.register_hook(lambda grad: self._add(slot, grad))

        handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _add(self, slot: int, grad: torch.Tensor) -> None:
        positions = torch.searchsorted(self.used, self.ids[slot])  # (B*S,)
        self.fisher.index_add_(0, positions, grad.detach().reshape(len(positions), -1).double().cpu() ** 2)


def _embedding_errors(reader: CheckpointReader, names: GGUFNames, request: SensitivityRequest,
                      embedding: _EmbeddingFisher, errors: TypeErrors) -> None:
    """err of the token embedding: sum_v sum_h F0_{v,h} (E_v - Q_t(E)_v)_h^2 over the used token ids."""
    with embedding_table(reader, names, request) as table:
        if table is None:
            return
        rows = table[embedding.used.numpy()]  # (U, H)
        fisher = embedding.fisher.numpy()
        errors["token_embd.weight"] = {t.name: float((fisher * _delta(rows, t) ** 2).sum())
                                       for t in request.wanted["token_embd.weight"]}


def measure_fisher_errors(folder: str | Path, names: GGUFNames, spec: GGUFArch, request: SensitivityRequest,
                          info: Any = None) -> TypeErrors:
    """Fisher-weighted err(tensor, type) of every tensor in `request.wanted` (module docstring)."""
    reader = CheckpointReader(Path(folder), dtype="float32", info=info)
    adapter, config = reader.adapter, reader.config
    engine = LayerEngine(reader.model, adapter, reader=reader, device=resolve_device(request.device))
    moe = {ref.index: ref for ref in adapter.moe_layers(reader.model)}
    embedding = _EmbeddingFisher(request.batches, int(config.hidden_size))
    errors: TypeErrors = {}

    @contextlib.contextmanager
    def hooks(index: int) -> Iterator[None]:
        linears = layer_linears(reader, index, names, spec, request.wanted)
        moments = {path: FisherMoment(module.in_features, module.out_features)
                   for path, (module, _) in linears.items()}
        recorded: list = []
        first = embedding.hooked(engine.layers[0]) if index == 0 else contextlib.nullcontext()
        with first, _layer_recorder(adapter, moe.get(index), linears, moments, recorded):
            yield
        _split_errors(linears, moments, names, spec, config, request, errors)
        if index in moe:
            _expert_errors(adapter, moe[index], recorded, names, request, errors)

    stream_backward(engine, request.batches, hooks, progress=request.progress, desc="gguf sensitivity (fisher)")
    _embedding_errors(reader, names, request, embedding, errors)
    request.tokens = int(sum(ids.numel() for _, ids in request.batches))
    missing = sorted(set(request.wanted) - set(errors))
    if missing:
        raise RuntimeError(f"internal error: no calibration error measured for {', '.join(missing[:4])}")
    return errors
