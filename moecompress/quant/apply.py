"""Quantise a model one decoder layer at a time, in the sequential pattern of GPTQ.

Calibration batches are embedded once and their hidden states cached between layers
(`LayerEngine`). For decoder layer i, with layers < i already quantised:

1. stage 0 (attention and other token mixers): hook their `nn.Linear` inputs while the
   layer runs on the cached inputs; quantise them;
2. stage 1 (the MLP slot: routed experts, shared experts, dense MLPs): run the layer again,
   now with quantised attention; routed experts get their statistics from the tokens routed
   to them (`run_experts` visitor), shared and dense MLPs from pre-hooks; quantise them;
   experts with fewer than `min_tokens` routed tokens fall back to round-to-nearest; when the
   layer's expert Hessians exceed `expert_memory`, the experts are done in several passes;
3. run the layer once more to produce the next layer's inputs, call `on_layer` (writers read
   the layer there), and release the layer: a model read through a `CheckpointReader` holds
   one decoder layer in memory at a time (the embeddings, final norm and head only while the
   head is quantised and written, after the last layer).

Dequantised weights are written back into the model (fused expert parameters through the
adapter's canonical views), so the model in memory is exactly what the checkpoint stores.
Without any GPTQ entry in the plan no calibration pass runs at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from moecompress.engine.layers import LayerEngine
from moecompress.engine.memory import return_freed_memory
from moecompress.engine.reader import CheckpointReader
from moecompress.engine.resume import LayerPassCheckpoints
from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef
from moecompress.quant.data_parallel import all_reduce_gptq, owners, reduce_gptq_to_owners, solve_experts_in_parallel
from moecompress.quant.layer_pass import (
    DEFAULT_EXPERT_MEMORY,
    ExpertHessians,
    LinearHessians,
    expert_chunks,
    hessian_bytes,
    record_block_inputs,
    run_cached,
    visit_recorded,
)
from moecompress.quant.gptq import GPTQ
from moecompress.quant.plan import QuantPlan
from moecompress.quant.solve import Solved, quantize_experts, quantize_weight, write_expert, write_linear
from moecompress.quant.spec import QuantSpec
from moecompress.quant.targets import STAGE_OF_ROLE, LinearTarget, ModelTargets, find_targets

log = logging.getLogger(__name__)


@dataclass
class LayerResult:
    """What quantising one decoder layer (or the output head) produced."""

    index: int | None  # decoder layer index; None for the output head
    linears: dict[str, Solved] = field(default_factory=dict)  # module name -> result
    experts: dict[str, dict[str, Solved]] = field(default_factory=dict)  # expert key -> projection -> result
    fallbacks: dict[str, int] = field(default_factory=dict)  # expert key -> tokens it saw (RTN fall-back)


@dataclass
class QuantReport:
    """Summary of a quantisation run."""

    fallbacks: dict[str, int] = field(default_factory=dict)
    methods: dict[str, int] = field(default_factory=dict)  # method -> number of matrices
    raised_damping: dict[str, float] = field(default_factory=dict)  # matrix -> damping used when raised

    def state(self) -> dict[str, dict[str, Any]]:
        """The report so far as JSON-ready data (a resumable run's checkpoint)."""
        return {"fallbacks": dict(self.fallbacks), "methods": dict(self.methods),
                "raised_damping": dict(self.raised_damping)}

    @classmethod
    def from_state(cls, state: dict[str, dict[str, Any]] | None) -> QuantReport:
        """The report `state()` described (an empty one for None)."""
        return cls(**state) if state else cls()

    def add(self, result: LayerResult, requested_damp: dict[str, float]) -> None:
        """Fold one layer's results in."""
        self.fallbacks.update(result.fallbacks)
        solved = [(name, s) for name, s in result.linears.items()]
        solved += [(f"{key}.{proj}", s) for key, projs in result.experts.items() for proj, s in projs.items()]
        for name, s in solved:
            self.methods[s.method] = self.methods.get(s.method, 0) + 1
            want = requested_damp.get(name, requested_damp.get(name.rsplit(".", 1)[0]))
            if s.damp is not None and want is not None and s.damp > want:
                self.raised_damping[name] = s.damp


LayerCallback = Callable[[int | None, LayerResult], None]


class Resumable(Protocol):
    """A writer whose progress a resumable run checkpoints after every layer."""

    def state(self) -> dict[str, Any]:
        """What `restore` needs to continue in another process."""

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state`."""


def _needs_statistics(plan: QuantPlan) -> bool:
    return any(entry.spec is not None and entry.spec.method == "gptq" and entry.role != "lm_head"
               for entry in plan.entries.values())


@dataclass
class QuantPass:
    """How `quantize_model` runs: GPTQ's statistics, memory, where the layers come from and compute, resuming."""

    min_tokens: int = 16  # fewer calibration tokens than this: round-to-nearest instead of GPTQ
    weighted_hessian: bool = False  # expert Hessians weighted by the routing weights
    expert_memory: int = DEFAULT_EXPERT_MEMORY  # bytes of expert Hessians held at once
    reader: CheckpointReader | None = None  # the checkpoint a meta-device model is read from
    device: torch.device | str | None = None  # where layers, Hessians and solves run
    checkpoints: LayerPassCheckpoints | None = None  # where the pass saves its progress and resumes from
    resumable: Resumable | None = None  # a writer whose state is saved and restored with the pass


def quantize_model(model: nn.Module, adapter: MoEAdapter, plan: QuantPlan,
                   batches: Sequence[tuple[str, torch.Tensor]] | None, on_layer: LayerCallback | None = None,
                   options: QuantPass | None = None, progress: bool = True) -> QuantReport:
    """Quantise every entry of `plan` in place, layer by layer; `on_layer(i, result)` after each layer.

    batches: (domain, (B, S) token ids) calibration batches; may be None when every entry uses
    round-to-nearest. The output head (when in the plan) is quantised last, with RTN.
    options (`QuantPass`): options.expert_memory: bytes of expert Hessians held at once; a MoE layer whose experts need more
    is processed in several passes over its cached inputs (same result).
    options.reader: the checkpoint `model` (a meta-device skeleton) is read from, one layer at a
    time; options.device: where layers, Hessians and GPTQ solves run (default: where the model
    is). options.checkpoints: where the pass saves its progress after each layer (the cached inputs of the
    next, the report, `options.resumable`'s state) and resumes from; earlier layers are not re-read.
    """
    options = options or QuantPass()
    resumable = options.resumable
    targets = find_targets(model, adapter)
    checkpoints = options.checkpoints or LayerPassCheckpoints(None, "quantizing")
    needs_data = _needs_statistics(plan)
    if needs_data and not batches:
        raise ValueError("GPTQ needs calibration batches")
    if needs_data and not getattr(adapter, "layerwise_supported", True):
        raise MoecompressError(f"{model.config.model_type} layers pass state between layers: GPTQ cannot run one "
                               "layer at a time on it; use round-to-nearest")
    engine = LayerEngine(model, adapter, reader=options.reader, device=options.device)
    runner = None
    if needs_data:
        runner = engine
        runner.prepare(batches)  # type: ignore[arg-type]
    restored = checkpoints.restore(runner, targets.num_layers)
    report = QuantReport.from_state(restored.state.get("report"))
    if resumable is not None and "writer" in restored.state:
        resumable.restore(restored.state["writer"])
    damp = {name: entry.spec.damp for name, entry in plan.entries.items() if entry.spec is not None}
    for index in tqdm(range(restored.next_layer, targets.num_layers), total=targets.num_layers,
                      initial=restored.next_layer, desc="quantising", unit="layer", disable=not progress):
        with engine.layer_loaded(index):
            result = _quantize_layer(adapter, plan, targets, index, runner, options)
            if runner is not None:
                runner.run_layer(index)
            report.add(result, damp)
            if on_layer is not None:
                on_layer(index, result)
            del result  # its codes (a byte per weight of the layer) must not live on while the next layer is solved
        state: dict[str, Any] = {"report": report.state()}
        if resumable is not None:
            state["writer"] = resumable.state()
        checkpoints.save(runner, index, None, state)
    result = LayerResult(index=None)  # everything outside the decoder layers: embeddings, final norm, head
    with engine.outside_layers_loaded(include_head=True):
        if targets.head is not None:
            entry = plan.entries.get(targets.head.name)
            if entry is not None and entry.spec is not None:
                spec = entry.spec.model_copy(update={"method": "rtn"})
                result.linears[targets.head.name] = solved = quantize_weight(targets.head.module.weight, spec, None, 0)
                write_linear(targets.head.module, solved)
                report.add(result, damp)
        if on_layer is not None:
            on_layer(None, result)  # also for tied heads: writers store the embeddings and final norm here
    return report


def _quantize_layer(adapter: MoEAdapter, plan: QuantPlan, targets: ModelTargets, index: int,
                    runner: LayerEngine | None, options: QuantPass) -> LayerResult:
    min_tokens, weighted, expert_memory = options.min_tokens, options.weighted_hessian, options.expert_memory
    result = LayerResult(index=index)
    moe = targets.moe.get(index)
    for stage in (0, 1):
        linears = [t for t in targets.linears[index]
                   if STAGE_OF_ROLE[t.role] == stage and _spec(plan, t.name) is not None]
        experts = _planned_experts(plan, moe) if (stage == 1 and moe is not None) else {}
        if not linears and not experts:
            continue
        linear_stats = LinearHessians({t.name: t.module for t in linears if _spec(plan, t.name).method == "gptq"})
        gptq_experts = [e for e, spec in experts.items() if spec.method == "gptq"] if runner is not None else []
        if runner is not None and (linear_stats.modules or gptq_experts):
            recorded = None
            with linear_stats.hooked():
                if gptq_experts:
                    assert moe is not None
                    recorded = record_block_inputs(runner, moe, index, advance=False)
                else:
                    run_cached(runner, index, stop_at=_later_stages(targets, index, moe) if stage == 0 else ())
            if stage == 0 and any(stats.tokens == 0 for stats in linear_stats.stats.values()):
                linear_stats = LinearHessians(linear_stats.modules)  # a layer running its MLP first: no early stop
                with linear_stats.hooked():
                    run_cached(runner, index)
            all_reduce_gptq(linear_stats.stats.values())  # data parallel: the statistics of every rank's batches
            if gptq_experts:
                assert moe is not None and recorded is not None
                probe = adapter.expert_weights(moe, 0)
                hidden, width = probe.up.shape[1], probe.up.shape[0]
                for chunk in expert_chunks(gptq_experts, hessian_bytes(hidden, width), expert_memory):
                    expert_stats = ExpertHessians(moe.num_experts, hidden, width, experts=chunk, weighted=weighted)
                    visit_recorded(adapter, moe, recorded, expert_stats, chunk)
                    owner = owners(chunk)  # data parallel: each expert's Hessians summed on the rank that solves it
                    reduce_gptq_to_owners([(expert_stats.inputs[e], owner[e]) for e in sorted(chunk)]
                                          + [(expert_stats.activations[e], owner[e]) for e in sorted(chunk)])
                    _quantize_experts(adapter, moe, {e: experts[e] for e in chunk}, expert_stats, min_tokens, result)
                    del expert_stats  # the next group's Hessians replace these, never beside them
                    return_freed_memory()
        rest = {e: spec for e, spec in experts.items() if e not in set(gptq_experts)}
        if rest:
            assert moe is not None
            _quantize_experts(adapter, moe, rest, None, min_tokens, result)
        for target in linears:
            _quantize_linear(plan, target, linear_stats, min_tokens, result)
    return result


def _later_stages(targets: ModelTargets, index: int, moe: MoELayerRef | None) -> list[nn.Module]:
    """Modules of decoder layer `index` that run after its attention: the MoE block and MLP linears."""
    modules: list[nn.Module] = [t.module for t in targets.linears[index] if STAGE_OF_ROLE[t.role] > 0]
    return modules + ([moe.block] if moe is not None else [])


def _spec(plan: QuantPlan, name: str) -> QuantSpec | None:
    entry = plan.entries.get(name)
    return None if entry is None else entry.spec


def _planned_experts(plan: QuantPlan, moe: MoELayerRef) -> dict[int, QuantSpec]:
    """Expert id -> spec of every quantised expert of one MoE layer."""
    out = {}
    for e in range(moe.num_experts):
        spec = _spec(plan, f"{moe.experts_path}.{e}")
        if spec is not None:
            out[e] = spec
    return out


def check_finite_statistics(name: str, stats: GPTQ | None) -> None:
    """GPTQ statistics without NaN or Inf, else a one-line error naming the matrix (nothing is written)."""
    if stats is not None and stats.tokens and not bool(torch.isfinite(stats.hessian).all()):
        raise MoecompressError(f"the GPTQ statistics (Hessian) of {name} hold NaN or Inf values; its inputs "
                               "overflow in this dtype (try --dtype float32) or the weights before it are corrupt")


def check_finite_solution(name: str, solved: Solved) -> None:
    """A quantised matrix with finite scales, else a one-line error naming it (never written silently)."""
    if not bool(torch.isfinite(solved.weight.scales).all()):
        raise MoecompressError(f"quantising {name} ({solved.method}) gave NaN or Inf scales; its weights or "
                               "statistics are not finite")


def _quantize_linear(plan: QuantPlan, target: LinearTarget, stats: LinearHessians, min_tokens: int,
                     result: LayerResult) -> None:
    spec = _spec(plan, target.name)
    check_finite_statistics(target.name, stats.stats.get(target.name))
    solved = quantize_weight(target.module.weight, spec, stats.stats.get(target.name), min_tokens)
    check_finite_solution(target.name, solved)
    write_linear(target.module, solved)
    result.linears[target.name] = solved


def _quantize_experts(adapter: MoEAdapter, moe: MoELayerRef, experts: dict[int, QuantSpec],
                      stats: ExpertHessians | None,
                      min_tokens: int, result: LayerResult) -> None:
    canonical = {e: adapter.expert_weights(moe, e) for e in experts}
    inputs = stats.inputs if stats is not None else {}
    activations = stats.activations if stats is not None else {}
    device = next(iter(canonical.values())).up.device
    for e in experts:
        check_finite_statistics(f"{moe.experts_path}.{e} (gate/up inputs)", inputs.get(e))
        check_finite_statistics(f"{moe.experts_path}.{e} (down inputs)", activations.get(e))

    def solve(owned: list[int]) -> dict[int, dict[str, Solved]]:
        try:
            return quantize_experts({e: canonical[e] for e in owned}, {e: experts[e] for e in owned}, inputs,
                                    activations, min_tokens)
        except RuntimeError as err:  # a Hessian no damping makes positive definite
            raise MoecompressError(f"GPTQ of the routed experts of {moe.experts_path}: {err}") from None

    solved_all = solve_experts_in_parallel(solve, sorted(experts), device)  # under torchrun: a share per rank
    for e, solved in solved_all.items():
        key = f"{moe.experts_path}.{e}"
        for proj, item in solved.items():
            check_finite_solution(f"{key}.{proj}", item)
        write_expert(canonical[e], solved)
        result.experts[key] = solved
        if any(s.method == "rtn-fallback" for s in solved.values()):
            result.fallbacks[key] = stats.tokens(e) if stats is not None else 0
            log.info("%s saw %d tokens (< %d): round-to-nearest", key, result.fallbacks[key], min_tokens)
