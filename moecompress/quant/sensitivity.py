"""How much each routed expert suffers at each candidate width: the costs the bit allocator minimises.

Only expert i changes when expert i alone is quantised (the router is never quantised, so
routing is unchanged), and the MoE block output changes by g_{i,t} (f_i(x_t) - f^b_i(x_t)) on
the tokens routed to i. Both costs are therefore exact sums over expert i's own tokens,
computed from cached layer inputs, never by re-running the model per candidate:

* MC-MoE PMQ (Mixture Compressor for MoE LLMs Gains More, arXiv 2410.06270):
      L_{i,b} = ||Z - Z_hat^{i,b}||_F = sqrt(sum_{t->i} ||g_{i,t} (f_i(x_t) - f^b_i(x_t))||^2)
      cost_{i,b} = f_i^alpha * w_i^beta * L_{i,b}^alpha      (alpha = 1, beta = 1.5)
  with f_i the normalised selection frequency (N_i / sum_j N_j) and w_i the normalised routing
  weight (sum_t g_{i,t} / sum_j sum_t g_{j,t}), both from the same pass. Measured layer by
  layer on the unquantised model (`block_errors`).
* GEMQ (Global Expert-Level Mixed-Precision Quantization for MoE LLMs):
      cost_{l,i,b} = sum_{t->i} sum_h G_{t,h}^2 (g_{i,t} (f_i(x_t) - f^b_i(x_t)))_h^2
  with G = dLoss/d(MoE block output), the gradient at the layer output (the residual adds the
  block output unchanged): a Fisher-weighted output error, comparable across layers. Needs the
  loss's backward pass over the calibration data, streamed one decoder layer at a time
  (`fisher_errors`, `moecompress.engine.backward`).

f^b_i is expert i with its three projections quantised to b bits (round-to-nearest by
default, or GPTQ on the expert's own tokens). Width 0 ("drop") is measured too: the error of
removing expert i's contribution, used to put pruning scores on the same scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moecompress.calibration.gradients import activation_gradients
from moecompress.engine.layers import LayerEngine
from moecompress.engine.memory import return_freed_memory
from moecompress.engine.reader import CheckpointReader
from moecompress.engine.resume import LayerPassCheckpoints
from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import CanonicalExpert, MoEAdapter, MoELayerRef
from moecompress.quant.data_parallel import all_reduce_gptq, all_reduce_sums
from moecompress.quant.layer_pass import (
    DEFAULT_EXPERT_MEMORY,
    ExpertHessians,
    expert_chunks,
    hessian_bytes,
    record_block_inputs,
    visit_recorded,
)
from moecompress.quant.solve import dequantized_expert, quantize_experts
from moecompress.quant.spec import QuantSpec


@dataclass
class LayerErrors:
    """Accumulated per-expert errors of one MoE layer."""

    widths: list[int]
    error: torch.Tensor  # (E, C) squared (optionally Fisher-weighted) block-output error per width
    drop_error: torch.Tensor  # (E,) the same for removing the expert
    count: torch.Tensor  # (E,) tokens routed to each expert
    gate_sum: torch.Tensor  # (E,) sum of gate values

    @classmethod
    def zeros(cls, num_experts: int, widths: Sequence[int]) -> LayerErrors:
        return cls(list(widths), torch.zeros(num_experts, len(widths), dtype=torch.float64),
                   torch.zeros(num_experts, dtype=torch.float64), torch.zeros(num_experts, dtype=torch.float64),
                   torch.zeros(num_experts, dtype=torch.float64))


@dataclass
class Sensitivity:
    """Per-layer expert errors at every candidate width, and the costs derived from them."""

    kind: str  # "block-error" (MC-MoE) or "fisher" (GEMQ)
    widths: list[int]
    layers: dict[int, LayerErrors]

    def mc_moe_costs(self, alpha: float = 1.0, beta: float = 1.5) -> dict[int, torch.Tensor]:
        """MC-MoE costs f^alpha w^beta L^alpha per layer, (E, C)."""
        out = {}
        for layer, errs in self.layers.items():
            freq = errs.count / errs.count.sum().clamp(min=1e-30)
            weight = errs.gate_sum / errs.gate_sum.sum().clamp(min=1e-30)
            norm = errs.error.clamp(min=0).sqrt()  # L_{i,b} = ||Z - Z_hat||_F
            out[layer] = (freq**alpha * weight**beta)[:, None] * norm**alpha
        return out

    def gemq_costs(self) -> dict[int, torch.Tensor]:
        """GEMQ costs: the Fisher-weighted squared output errors as measured, (E, C)."""
        return {layer: errs.error.clone() for layer, errs in self.layers.items()}

    def drop_costs(self, alpha: float = 1.0, beta: float = 1.5) -> dict[int, torch.Tensor]:
        """Cost of removing each expert on the same scale as `costs()`, (E,)."""
        out = {}
        for layer, errs in self.layers.items():
            if self.kind == "fisher":
                out[layer] = errs.drop_error.clone()
            else:
                freq = errs.count / errs.count.sum().clamp(min=1e-30)
                weight = errs.gate_sum / errs.gate_sum.sum().clamp(min=1e-30)
                out[layer] = freq**alpha * weight**beta * errs.drop_error.clamp(min=0).sqrt() ** alpha
        return out

    def costs(self, alpha: float = 1.0, beta: float = 1.5) -> dict[int, torch.Tensor]:
        """The allocation costs of this measurement (MC-MoE for block errors, GEMQ for Fisher)."""
        return self.gemq_costs() if self.kind == "fisher" else self.mc_moe_costs(alpha, beta)


class ErrorVisitor:
    """Expert visitor accumulating each candidate's (weighted) output error on the routed tokens."""

    def __init__(self, errors: LayerErrors, reference: dict[int, CanonicalExpert],
                 candidates: dict[int, dict[int, CanonicalExpert]]) -> None:
        self.errors = errors
        self.reference = reference
        self.candidates = candidates  # expert -> width -> quantised expert
        self.fisher: torch.Tensor | None = None  # (T, H) squared gradients of the current batch

    @torch.no_grad()
    def __call__(self, expert: int, token_idx: torch.Tensor, slot: torch.Tensor, x: torch.Tensor,
                 act: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> None:
        if expert not in self.candidates:  # measured in another pass
            return
        errs = self.errors
        x = x.detach().float()
        g = gate.detach().double()[:, None]  # (N, 1)
        weight = None if self.fisher is None else self.fisher[token_idx].double()  # (N, H)
        ref = self.reference[expert].forward(x).double()  # (N, H)

        def weighted_sq(delta: torch.Tensor) -> float:
            sq = (g * delta) ** 2
            return float((sq if weight is None else sq * weight).sum())

        errs.count[expert] += x.shape[0]
        errs.gate_sum[expert] += float(g.sum())
        errs.drop_error[expert] += weighted_sq(ref)
        for c, width in enumerate(errs.widths):
            approx = self.candidates[expert][width].forward(x).double()
            errs.error[expert, c] += weighted_sq(ref - approx)


def _float_expert(expert: CanonicalExpert) -> CanonicalExpert:
    """A float32 copy of an expert's weights (detached from the model)."""
    def conv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(torch.float32, copy=True)  # one copy, never two

    return CanonicalExpert(gate=conv(expert.gate), up=conv(expert.up), down=conv(expert.down),
                           gate_bias=conv(expert.gate_bias), up_bias=conv(expert.up_bias),
                           down_bias=conv(expert.down_bias), act=expert.act)


def candidate_experts(adapter: MoEAdapter, layer: MoELayerRef, experts: Sequence[int], widths: Sequence[int],
                      base: QuantSpec, hessians: ExpertHessians | None = None, min_tokens: int = 0
                      ) -> tuple[dict[int, CanonicalExpert], dict[int, dict[int, CanonicalExpert]]]:
    """(reference experts, expert -> width -> quantised copy) for some experts of one MoE layer."""
    reference = {e: _float_expert(adapter.expert_weights(layer, e)) for e in experts}
    candidates: dict[int, dict[int, CanonicalExpert]] = {e: {} for e in experts}
    inputs = hessians.inputs if hessians else {}
    acts = hessians.activations if hessians else {}
    for width in widths:
        spec = base.model_copy(update={"bits": width} if hessians else {"bits": width, "method": "rtn"})
        solved = quantize_experts(reference, {e: spec for e in experts}, inputs, acts, min_tokens)
        for e in experts:
            candidates[e][width] = dequantized_expert(reference[e], solved[e])
    return reference, candidates


def _bytes_per_expert(adapter: MoEAdapter, layer: MoELayerRef, widths: Sequence[int], quantizer: str) -> int:
    """float32 state one expert needs while its errors are measured (copies, and Hessians for GPTQ)."""
    probe = adapter.expert_weights(layer, 0)
    params = sum(w.numel() for w in (probe.gate, probe.up, probe.down) if w is not None)
    extra = hessian_bytes(probe.up.shape[1], probe.up.shape[0]) if quantizer == "gptq" else 0
    return 4 * params * (len(widths) + 1) + extra


@dataclass
class CandidateSettings:
    """How a sensitivity pass simulates and measures each expert's candidate widths (MC-MoE and GEMQ alike)."""

    widths: list[int]
    base: QuantSpec
    quantizer: str = "rtn"  # "rtn", or "gptq" on each expert's own tokens
    weighted: bool = False  # GPTQ candidates: gate-weighted Hessians
    min_tokens: int = 0
    expert_memory: int = DEFAULT_EXPERT_MEMORY


def _measure_chunk(adapter: MoEAdapter, ref: MoELayerRef, inputs: list, errors: LayerErrors, chunk: list[int],
                   settings: CandidateSettings, fisher: Sequence[torch.Tensor] | None = None) -> None:
    """Add one group of experts' candidate errors to `errors`; its copies and Hessians die on return.

    fisher: per recorded batch, the squared loss gradient at the MoE block's output (T, H) that
    weights the errors (GEMQ); None: unweighted (MC-MoE).
    """
    hessians = None
    if settings.quantizer == "gptq":
        probe = adapter.expert_weights(ref, 0)
        hessians = ExpertHessians(ref.num_experts, probe.up.shape[1], probe.up.shape[0], experts=chunk,
                                  weighted=settings.weighted)
        visit_recorded(adapter, ref, inputs, hessians, chunk)
        all_reduce_gptq([*hessians.inputs.values(), *hessians.activations.values()])  # data parallel: every rank's
    reference, candidates = candidate_experts(adapter, ref, chunk, settings.widths, settings.base, hessians,
                                              settings.min_tokens)
    visitor = ErrorVisitor(errors, reference, candidates)
    if fisher is None:
        visit_recorded(adapter, ref, inputs, visitor, chunk)
        return
    for recorded, weight in zip(inputs, fisher):
        visitor.fisher = weight
        visit_recorded(adapter, ref, [recorded], visitor, chunk)


def _measure_layer(adapter: MoEAdapter, ref: MoELayerRef, inputs: list, errors: LayerErrors,
                   settings: CandidateSettings, fisher: Sequence[torch.Tensor] | None = None) -> None:
    """Every expert's candidate errors on one MoE layer's recorded inputs, a group within `expert_memory` at a time."""
    per_expert = _bytes_per_expert(adapter, ref, settings.widths, settings.quantizer)
    for chunk in expert_chunks(range(ref.num_experts), per_expert, settings.expert_memory):
        _measure_chunk(adapter, ref, inputs, errors, chunk, settings, fisher)
        return_freed_memory()  # the group's copies are gone: hand their pages back before the next group


def block_errors(model: nn.Module, adapter: MoEAdapter, batches: Sequence[tuple[str, torch.Tensor]],
                 settings: CandidateSettings, progress: bool = True, reader: CheckpointReader | None = None,
                 device: torch.device | str | None = None, checkpoints: LayerPassCheckpoints | None = None
                 ) -> Sensitivity:
    """MC-MoE block-output errors of every expert at every width, one decoder layer at a time.

    Each MoE layer runs once on its cached inputs, recording what its MoE block receives; the
    experts are then measured on those recorded inputs, routed by the layer's own router, a
    group of experts within `expert_memory` (candidate copies and Hessians) at a time. Only the
    group's experts are computed for it, so splitting into groups costs no extra layer passes.
    reader: the checkpoint `model` (a meta-device skeleton) is read from, one layer at a time;
    device: where the layers and the candidates compute (default: where the model is).
    checkpoints: where the pass saves each finished layer's errors and the next layer's inputs,
    and resumes from (`moecompress.engine.resume`).
    """
    checkpoints = checkpoints or LayerPassCheckpoints(None, "sensitivity")
    runner = LayerEngine(model, adapter, reader=reader, device=device)
    runner.prepare(batches)
    moe = {ref.index: ref for ref in adapter.moe_layers(model)}
    total = len(runner.layers)
    restored = checkpoints.restore(runner, total)
    widths = settings.widths
    layers = {index: LayerErrors(list(widths), **saved) for index, saved in restored.layers.items()}
    for index in tqdm(range(restored.next_layer, total), total=total, initial=restored.next_layer,
                      desc="sensitivity", unit="layer", disable=not progress):
        with runner.layer_loaded(index):
            if index not in moe:
                runner.run_layer(index)
                checkpoints.save(runner, index)
                continue
            ref = moe[index]
            inputs = record_block_inputs(runner, ref, index, advance=True)
            errors = LayerErrors.zeros(ref.num_experts, widths)
            _measure_layer(adapter, ref, inputs, errors, settings)
            all_reduce_sums([errors.error, errors.drop_error, errors.count, errors.gate_sum])  # data parallel
            layers[index] = errors
        checkpoints.save(runner, index, {"error": errors.error, "drop_error": errors.drop_error,
                                         "count": errors.count, "gate_sum": errors.gate_sum})
    return Sensitivity("block-error", list(widths), layers)


@contextlib.contextmanager
def fisher_recorder(adapter: MoEAdapter, ref: MoELayerRef, errors: LayerErrors, settings: CandidateSettings
                    ) -> Iterator[None]:
    """Record MoE layer `ref`'s block inputs, routing and squared output gradients; measure GEMQ's errors on exit.

    Inside the block, every forward of the block whose output is backpropagated adds one
    recorded batch: the block's input (T, H), the layer's own routing of it, and, when the
    gradient arrives, G^2 (T, H) with G = dLoss/d(block output). On a normal exit, with the
    layer's weights still loaded, every expert's candidates are built once (a group within
    `expert_memory` at a time, RTN or GPTQ on the recorded tokens as for MC-MoE) and their
    output errors on the recorded tokens, weighted by G^2, are added to `errors`.
    """
    inputs: list[tuple[torch.Tensor, Any]] = []
    fisher: list[torch.Tensor | None] = []

    def forward_hook(module: nn.Module, args: tuple, output: object) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        hidden = args[0].detach()
        flat = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
        with torch.no_grad():
            inputs.append((flat, adapter.route(ref, flat)))
        slot = len(fisher)
        fisher.append(None)

        def on_grad(grad: torch.Tensor) -> None:
            fisher[slot] = grad.detach().reshape(-1, grad.shape[-1]).float() ** 2  # (T, H)

        out.register_hook(on_grad)

    handle = ref.block.register_forward_hook(forward_hook)
    try:
        yield
    finally:
        handle.remove()
    kept = [(recorded, weight) for recorded, weight in zip(inputs, fisher) if weight is not None]
    _measure_layer(adapter, ref, [recorded for recorded, _ in kept], errors, settings,
                   fisher=[weight for _, weight in kept])


def fisher_errors(model: nn.Module, adapter: MoEAdapter, batches: Sequence[tuple[str, torch.Tensor]],
                  settings: CandidateSettings, progress: bool = True, reader: CheckpointReader | None = None,
                  device: torch.device | str | None = None) -> Sensitivity:
    """GEMQ Fisher-weighted errors from the loss's backward pass, one decoder layer at a time.

    The backward pass streams through the layer engine (`moecompress.engine.backward`): each
    layer is recomputed on its kept input and backpropagated while `fisher_recorder` records
    its MoE block; the layer's candidate errors are then measured with its weights still
    loaded. reader: the checkpoint `model` (a meta-device skeleton) is read from; device: where
    the layers compute. Architectures whose layers cannot run one at a time
    (`layerwise_supported` False) take one whole-model backward per batch instead (the model
    must be in memory). Data parallel: each rank backpropagates its own batches and the errors
    (and GPTQ candidates' Hessians) are all-reduced, so every rank holds the single-process sums.
    """
    from moecompress.engine.backward import stream_backward

    refs = {ref.index: ref for ref in adapter.moe_layers(model)}
    layers = {index: LayerErrors.zeros(ref.num_experts, settings.widths) for index, ref in refs.items()}
    if adapter.layerwise_supported:
        engine = LayerEngine(model, adapter, reader=reader, device=device)

        def hooks(index: int) -> contextlib.AbstractContextManager:
            if index not in refs:
                return contextlib.nullcontext()
            return fisher_recorder(adapter, refs[index], layers[index], settings)

        stream_backward(engine, batches, hooks, progress=progress, desc="gradients (GEMQ)")
    else:
        if reader is not None:
            raise MoecompressError(f"{model.config.model_type} layers pass state between layers: GEMQ needs the "
                                   "whole model in memory for them")
        whole_model_fisher_errors(model, adapter, batches, layers, settings, progress)
    for index in sorted(layers):  # data parallel: every rank's batches (the same layers, in the same order)
        errors = layers[index]
        all_reduce_sums([errors.error, errors.drop_error, errors.count, errors.gate_sum])
    return Sensitivity("fisher", list(settings.widths), layers)


def whole_model_fisher_errors(model: nn.Module, adapter: MoEAdapter, batches: Sequence[tuple[str, torch.Tensor]],
                              layers: dict[int, LayerErrors], settings: CandidateSettings, progress: bool = True) -> None:
    """Add GEMQ's Fisher-weighted errors to `layers` from one forward + backward of the whole model per batch.

    Every MoE layer's recorder holds its recorded batches until the last batch is done.
    """
    with contextlib.ExitStack() as stack:
        for ref in adapter.moe_layers(model):
            if ref.index in layers:
                stack.enter_context(fisher_recorder(adapter, ref, layers[ref.index], settings))
        with activation_gradients(model):
            for _, ids in tqdm(batches, desc="gradients (GEMQ)", unit="batch", disable=not progress):
                with torch.enable_grad():
                    ids = ids.to(next(model.parameters()).device)  # the model's device (--device)
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    loss.backward()
