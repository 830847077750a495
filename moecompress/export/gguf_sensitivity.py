"""What each candidate GGML type costs each allocated GGUF tensor, measured on calibration data.

For a tensor W (rows, in) whose inputs are x_t over the calibration tokens that reach it:

    err(W, t) = sum_t c_t ||(W - Q_t(W)) x_t||^2 = tr(D H D^T),   D = W - Q_t(W),   H = sum_t c_t x_t x_t^T

with Q_t the round trip through `gguf.quants` (quantise, dequantise: exactly what llama.cpp
computes with) and H the full input second moment (in, in), held exactly as an `InputMoment` (the rows
sqrt(c_t) x_t while there are fewer than twice the width of them, else H in float64):

* attention, shared-expert and dense-MLP linears: c_t = 1 over every calibration token, H from a
  pre-hook on the linear while the decoder layer runs;
* routed experts, stacked per layer (E, rows, in): err = sum_e tr(D_e H_e D_e^T), H_e over the
  tokens routed to expert e with c_t = g_{e,t}^2 (the gate scales the expert's output, so its
  error reaches the MoE block's output times g); gate/up from the token states, down from the
  expert's activations (the adapter's `run_experts` visitor on the recorded block inputs);
* the token embedding (a lookup, its input one-hot): err = sum_v n_v ||E_v - Q_t(E)_v||^2, n_v the
  count of token v in the calibration windows;
* a tensor written transposed relative to its linear (DeepSeek's attn_k_b, (heads, kv_rank, nope)
  from kv_b's (nope, kv_rank) rows per head) has D transposed back before the product.

The model runs on the unquantised float32 weights through the layer engine, one decoder layer
in memory at a time (`CheckpointReader`), on `request.device` (the moments accumulate there in
float64; the round trips through `gguf.quants` run on the host); a MoE layer's expert moments are held a group of
experts at a time (`expert_chunks`, within `expert_memory` bytes, each expert sized by the most tokens any expert
was routed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn
from tqdm.auto import tqdm

from moecompress.engine.layers import LayerEngine, resolve_device
from moecompress.engine.reader import CheckpointReader
from moecompress.export.gguf_moments import InputMoment, moment_bytes
from moecompress.io.gguf.arches import GGUFArch
from moecompress.io.gguf.names import EXPERT_PROJECTIONS, GGUFNames
from moecompress.io.gguf.types import decode, encode
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef, RouterOutput
from moecompress.quant.layer_pass import DEFAULT_EXPERT_MEMORY, expert_chunks, record_block_inputs, visit_recorded

# GGUF tensor name -> candidate type name -> err (the formula above)
TypeErrors = dict[str, dict[str, float]]
# GGUF tensors stored transposed relative to the linear they come from ((..., in, rows))
TRANSPOSED: tuple[str, ...] = ("attn_k_b",)


@dataclass
class SensitivityRequest:
    """Which tensors to measure at which types, on which calibration batches."""

    wanted: dict[str, list[GGMLQuantizationType]]  # GGUF name -> candidate types
    batches: list[tuple[str, torch.Tensor]]  # (domain, (B, S) token ids)
    expert_memory: int = DEFAULT_EXPERT_MEMORY
    progress: bool = True
    device: str = "cpu"  # where the layers (and the statistics) compute; the types' round trips stay on the host
    tokens: int = field(default=0)  # calibration tokens seen (set by the pass)


def roundtrip(weight: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`weight` (..., in) float32 quantised to `qtype` and dequantised again (what llama.cpp multiplies with)."""
    if qtype == GGMLQuantizationType.F32:
        return weight
    return decode(encode(weight, qtype), qtype).reshape(weight.shape)


def weighted_error(weight: np.ndarray, qtype: GGMLQuantizationType, moment: InputMoment) -> float:
    """tr(D H D^T) for D = weight - Q(weight); weight (..., in) float32, H the inputs' `moment`."""
    if qtype == GGMLQuantizationType.F32:
        return 0.0
    return moment.trace((weight - roundtrip(weight, qtype)).reshape(-1, weight.shape[-1]))  # D (R, in)


def tensor_error(gguf_tensor: np.ndarray, qtype: GGMLQuantizationType, moment: InputMoment,
                 transposed: bool = False) -> float:
    """err of one GGUF-layout tensor: its rows are a linear's rows (`moment`'s width), or, transposed, its columns."""
    if not transposed:
        return weighted_error(gguf_tensor, qtype, moment)
    # stored transposed (attn_k_b): quantise in GGUF layout, then put the error's axes back
    delta = gguf_tensor - roundtrip(gguf_tensor, qtype)  # (..., in, rows)
    return moment.trace(np.swapaxes(delta, -1, -2).reshape(-1, moment.width))  # D (R, in)


class _ExpertMoments:
    """Per routed expert: gate^2-weighted second moments of its inputs (H, H) and activations (I, I)."""

    def __init__(self, experts: Sequence[int], hidden: int, intermediate: int) -> None:
        self.inputs = {e: InputMoment(hidden) for e in experts}
        self.activations = {e: InputMoment(intermediate) for e in experts}

    def __call__(self, expert: int, token_idx: torch.Tensor, slot: torch.Tensor, x: torch.Tensor,
                 act: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> None:
        if expert not in self.inputs:
            return
        weight = gate.detach().double() ** 2  # (N,)
        self.inputs[expert].add(x, weight)
        self.activations[expert].add(act, weight)


@contextlib.contextmanager
def _hooked(modules: dict[str, nn.Linear], moments: dict[str, InputMoment]) -> Iterator[None]:
    handles = []
    try:
        for path, module in modules.items():
            def hook(mod: nn.Module, args: tuple, _m: InputMoment = moments[path]) -> None:
                _m.add(args[0])

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_linears(reader: CheckpointReader, index: int, names: GGUFNames, spec: GGUFArch,
                   wanted: dict[str, Any]) -> dict[str, tuple[nn.Linear, str]]:
    """module path -> (linear, its weight's key) for the linears of layer `index` with a tensor to measure."""
    model, config = reader.model, reader.config
    out = {}
    for key in reader.layer_keys(index):
        if not key.endswith(".weight"):
            continue
        path = key[: -len(".weight")]
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(module, nn.Linear):
            continue
        produced = [name for name, _ in spec.split(names.resolve(key), module.weight, config)]
        if any(name in wanted for name in produced):
            out[path] = (module, key)
    return out


def _linear_errors(linears: dict[str, tuple[nn.Linear, str]], moments: dict[str, InputMoment], names: GGUFNames,
                   spec: GGUFArch, config: Any, request: SensitivityRequest, errors: TypeErrors) -> None:
    for path, (module, key) in linears.items():
        moment = moments[path]
        weight = module.weight.detach().float().cpu()
        for name, tensor in spec.split(names.resolve(key), weight, config):
            if name not in request.wanted:
                continue
            array = tensor.contiguous().numpy()
            transposed = name.split(".")[-2] in TRANSPOSED or array.shape[-1] != moment.width
            errors[name] = {t.name: tensor_error(array, t, moment, transposed) for t in request.wanted[name]}


def expert_targets(adapter: MoEAdapter, ref: MoELayerRef, names: GGUFNames, request: SensitivityRequest,
                   errors: TypeErrors) -> tuple[int, int, dict[str, str]]:
    """(hidden H, expert width I, projection -> its stacked GGUF tensor) of MoE layer `ref`; the wanted ones' errors
    start at 0 in `errors`, for the experts' sums."""
    probe = adapter.expert_weights(ref, 0)
    hidden, intermediate = probe.up.shape[1], probe.up.shape[0]
    targets = {proj: names.experts(ref.experts_path, proj) for proj in EXPERT_PROJECTIONS}
    for name in targets.values():
        if name in request.wanted:
            errors[name] = {t.name: 0.0 for t in request.wanted[name]}
    return hidden, intermediate, targets


def busiest_expert_rows(routings: Sequence[RouterOutput], num_experts: int) -> int:
    """The most tokens any one expert was routed over the recorded batches (its moments' row count)."""
    counts = torch.zeros(num_experts, dtype=torch.long)
    for routed in routings:
        counts += torch.bincount(routed.index.reshape(-1).cpu().long(), minlength=num_experts)[:num_experts]
    return int(counts.max()) if num_experts else 0


def _expert_errors(adapter: MoEAdapter, ref: MoELayerRef, inputs: list, names: GGUFNames,
                   request: SensitivityRequest, errors: TypeErrors) -> None:
    """Sum over experts of tr(D_e H_e D_e^T) for the layer's stacked gate, up and down, a group of experts at a time."""
    hidden, intermediate, targets = expert_targets(adapter, ref, names, request, errors)
    rows = busiest_expert_rows([routed for _, routed in inputs], ref.num_experts)
    per_expert = moment_bytes(hidden, rows) + moment_bytes(intermediate, rows)
    for chunk in expert_chunks(range(ref.num_experts), per_expert, request.expert_memory):
        moments = _ExpertMoments(chunk, hidden, intermediate)
        visit_recorded(adapter, ref, inputs, moments, chunk)
        for e in chunk:
            expert = adapter.expert_weights(ref, e)
            for proj, attr in zip(EXPERT_PROJECTIONS, ("gate", "up", "down")):
                name = targets[proj]
                if name not in request.wanted:
                    continue
                weight = getattr(expert, attr).detach().float().cpu().contiguous().numpy()  # (rows, in)
                moment = (moments.activations if attr == "down" else moments.inputs)[e]
                for t in request.wanted[name]:
                    errors[name][t.name] += weighted_error(weight, t, moment)


@contextlib.contextmanager
def embedding_table(reader: CheckpointReader, names: GGUFNames, request: SensitivityRequest
                    ) -> Iterator[np.ndarray | None]:
    """The token embedding (V, H) float32 while the block runs, read from the checkpoint; None when not allocated."""
    keys = [key for key in reader.outside_layers(include_head=False)
            if key.endswith(".weight") and names.resolve(key) == "token_embd.weight"]
    if not keys or "token_embd.weight" not in request.wanted:
        yield None
        return
    reader.load_keys(keys, "cpu")
    try:
        yield reader.model.get_parameter(keys[0]).detach().float().contiguous().numpy()
    finally:
        reader.release_keys(keys)


def _embedding_errors(reader: CheckpointReader, names: GGUFNames, request: SensitivityRequest,
                      errors: TypeErrors) -> None:
    """err of the token embedding: calibration-count-weighted squared row errors."""
    with embedding_table(reader, names, request) as table:
        if table is None:
            return
        ids = torch.cat([ids.reshape(-1) for _, ids in request.batches])
        counts = torch.bincount(ids, minlength=table.shape[0]).double().numpy()  # (V,)
        used = np.nonzero(counts)[0]
        rows = table[used]  # (U, H)
        for t in request.wanted["token_embd.weight"]:
            if t == GGMLQuantizationType.F32:
                err = 0.0
            else:
                delta = (rows - roundtrip(rows, t)).astype(np.float64)
                err = float(((delta ** 2).sum(-1) * counts[used]).sum())
            errors.setdefault("token_embd.weight", {})[t.name] = err


def measure_type_errors(folder: str | Path, names: GGUFNames, spec: GGUFArch, request: SensitivityRequest,
                        info: Any = None) -> TypeErrors:
    """err(tensor, type) of every tensor in `request.wanted`, one decoder layer at a time (module docstring)."""
    reader = CheckpointReader(Path(folder), dtype="float32", info=info)
    adapter, config = reader.adapter, reader.config
    errors: TypeErrors = {}
    engine = LayerEngine(reader.model, adapter, reader=reader, device=resolve_device(request.device))
    engine.prepare(request.batches)
    moe = {ref.index: ref for ref in adapter.moe_layers(reader.model)}
    for index in tqdm(range(len(engine.layers)), desc="gguf sensitivity", unit="layer", disable=not request.progress):
        with engine.layer_loaded(index):
            linears = layer_linears(reader, index, names, spec, request.wanted)
            moments = {path: InputMoment(module.in_features) for path, (module, _) in linears.items()}
            with _hooked({path: module for path, (module, _) in linears.items()}, moments):
                if index in moe:
                    inputs = record_block_inputs(engine, moe[index], index, advance=True)
                else:
                    engine.run_layer(index)
                    inputs = []
            _linear_errors(linears, moments, names, spec, config, request, errors)
            if index in moe:
                _expert_errors(adapter, moe[index], inputs, names, request, errors)
            del inputs
    _embedding_errors(reader, names, request, errors)
    request.tokens = int(sum(ids.numel() for _, ids in request.batches))
    missing = sorted(set(request.wanted) - set(errors))
    if missing:
        raise RuntimeError(f"internal error: no calibration error measured for {', '.join(missing[:4])}")
    return errors
