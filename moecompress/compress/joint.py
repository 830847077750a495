"""Joint expert pruning and mixed-precision quantisation under one size budget (`moecompress compress`).

One integer program (`allocate` with the drop choice) gives every routed expert one of
{drop, b_1, ..., b_n} bits:

    cost(e, b)    = the quantisation cost of `sensitivity` (MC-MoE block error, or GEMQ Fisher error)
    cost(e, drop) = s_e / sum_j s_j * sum_j D_j         (per MoE layer)

where s_e is the expert's pruning score from the observer statistics (REAP by default; higher
= more important) and D_j is the measured cost of removing expert j (its whole gated
contribution, on the same scale as the quantisation costs). The pruning method decides which
experts are cheap to drop; the measured drop costs decide how dropping compares with losing
bits. Feasibility: every layer keeps the same number of experts K (stock configs hold one
expert count), K >= top_k and equal per group for group-limited routers; super experts are
never dropped. Dropped experts are removed (router rows and config patched) and the rest
quantised layer by layer.

Every pass reads the checkpoint one decoder layer at a time (`CheckpointReader`): statistics,
sensitivity (GEMQ's backward pass too, `moecompress.engine.backward`), and the
quantisation of the kept experts, which are served from the input's shards with the dropped
ones left out (`CheckpointReader.with_experts`), so no pruned copy is written first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecompress.engine import distributed
from moecompress.engine.resume import RunCheckpoints, source_fingerprint
from moecompress.errors import MoecompressError
from moecompress.quant.allocate import (DROP, Allocation, AllocationRules, PruneRules, SolverOptions, allocate,
                                        check_budget)
from moecompress.quant.run import QuantizeJob, QuantizeRequest, QuantizeResult, calibration_batches, write_quantized

log = logging.getLogger(__name__)


def drop_costs(scores: dict[int, torch.Tensor], measured: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Pruning scores (E,) rescaled per layer so they sum to the layer's measured removal cost."""
    out = {}
    for layer, score in scores.items():
        s = score.double().clamp(min=0)
        total = float(s.sum())
        share = s / total if total > 0 else torch.full_like(s, 1.0 / len(s))
        out[layer] = share * float(measured[layer].double().sum())
    return out


def joint_costs(quant: dict[int, torch.Tensor], drop: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """(E, 1 + C) cost tables: column 0 = drop, then the quantisation widths."""
    return {layer: torch.cat([drop[layer][:, None].double(), quant[layer].double()], dim=1) for layer in quant}


@dataclass
class JointPruning:
    """How the joint program scores experts for dropping: the pruning scorer, its parameters, super-expert
    protection, and statistics to reuse (`--stats`; None: a calibration pass collects them)."""

    method: str = "reap"
    params: dict[str, Any] | None = None
    protect_super_experts: bool = True
    stats: Any | None = None  # RoutingStats


def compress_checkpoint(checkpoint: str | Path, output: str | Path, request: QuantizeRequest,
                        pruning: JointPruning | None = None, sources: list[Any] | None = None, force: bool = False,
                        progress: bool = True, resume: bool = False) -> tuple[QuantizeResult, Allocation]:
    """Prune (`pruning`, default REAP) and quantise `checkpoint` into `output` under `request.size` (or `request.bits`).

    Checkpoints of the run are kept beside `output` (`moecompress.engine.resume`): the
    statistics pass, the sensitivity pass and the quantisation pass after every decoder
    layer; `resume` continues a killed run of the same request from them.
    """
    pruning = pruning or JointPruning()
    stats = pruning.stats
    with RunCheckpoints(output, "compress", resume=resume) as checkpoints:
        checkpoints.require("options", {"request": request.model_dump(mode="json"), "prune_method": pruning.method,
                                        "prune_params": pruning.params,
                                        "protect_super_experts": pruning.protect_super_experts,
                                        "stats": None if stats is None else stats.header.model_dump(mode="json"),
                                        "sources": [repr(item) for item in sources or []]})
        checkpoints.require("input checkpoint", source_fingerprint(checkpoint))
        return _compress(Path(checkpoint), output, request, pruning, sources, force, progress, checkpoints)


def _compress(source: Path, output: str | Path, request: QuantizeRequest, pruning: JointPruning,
              sources: list[Any] | None, force: bool, progress: bool, checkpoints: RunCheckpoints
              ) -> tuple[QuantizeResult, Allocation]:
    """`compress_checkpoint` inside the run's checkpoints."""
    from moecompress.calibration.calibrate import build_stats, collect_statistics, keep_statistics, resumed_statistics
    from moecompress.calibration.request import ObservedPass
    from moecompress.io.provenance import config_hash
    from moecompress.io.output import check_output_dir
    from moecompress.models.load import inspect_checkpoint, load_tokenizer
    from moecompress.prune.run import required_statistics, routing_shape
    from moecompress.prune.scorers import get_scorer
    from moecompress.prune.select import feasible_counts
    from moecompress.prune.super_experts import find_super_experts
    from moecompress.quant.budget import expert_sizes
    from moecompress.quant.run import check_finite_costs, expert_budget, measure_sensitivity
    from moecompress.quant.settings import PlanHeader, make_plan
    from moecompress.quant.targets import find_targets
    from moecompress.sizes import checkpoint_dtype

    prune_method, protect_super_experts, stats = pruning.method, pruning.protect_super_experts, pruning.stats
    distributed.initialise(request.device)  # under torchrun: data parallel passes, rank 0 writes
    check_output_dir(output, force, inputs=(source,))
    if request.method == "uniform" or request.uniform_per_layer:
        raise MoecompressError("compress chooses a width per expert: use --method mc-moe or gemq, "
                               "without --uniform-per-layer")
    info = inspect_checkpoint(source)
    if not info.adapter.layerwise_supported:
        raise MoecompressError(f"{info.config.model_type} layers pass state between layers; compress needs the "
                               "layer-at-a-time passes it cannot run")
    scorer = get_scorer(prune_method)
    params = scorer.parse_params(pruning.params)
    if scorer.granularity != "expert":
        raise MoecompressError(f"pruning method {prune_method!r} scores neurons; compress drops whole experts")
    if stats is not None and stats.header.config_hash != config_hash(info.config):
        raise MoecompressError("--stats were collected on a different model; re-run calibrate on this checkpoint")
    out_dtype = checkpoint_dtype(info) or torch.float32
    element_size = torch.empty((), dtype=out_dtype).element_size()
    tokenizer = load_tokenizer(source)
    torch.manual_seed(request.seed)
    batches, calib = calibration_batches(sources, request, tokenizer)
    if distributed.active():
        batches = distributed.shard(batches)  # this rank's share; the statistics pass shards the same windows itself
        progress = progress and distributed.is_writer()
    from moecompress.engine.layers import resolve_device
    from moecompress.quant.run import check_model_support, open_for_quantization

    device = resolve_device(request.device)
    streaming = check_model_support(info.adapter, info.config.model_type, request)
    model, adapter, reader = open_for_quantization(source, info, request, streaming, device)
    widths = request.widths()
    choices = [DROP, *widths]
    targets = find_targets(model, adapter)
    unit, budget, budget_record = expert_budget(model, adapter, targets, request, info.bytes_on_disk, element_size)
    sizes = expert_sizes(adapter, targets, choices, unit, request.settings, element_size)
    shape = routing_shape(adapter, info.config)
    check_budget(sizes, choices, budget, min_kept=min(feasible_counts(shape)))
    checkpoints.require("calibration data", calib.digest)
    if stats is None:
        stats = resumed_statistics(checkpoints)
    if stats is None:
        observer = collect_statistics(model, adapter, calib.input_ids, calib.domain_ids, calib.domains,
                                      ObservedPass(statistics=required_statistics(prune_method, protect_super_experts),
                                                   batch_size=request.batch_size, mode="layerwise", reader=reader,
                                                   device=device, data_parallel=True,
                                                   checkpoints=checkpoints.layer_pass("calibrating")), progress)
        stats = build_stats(model, observer, source, calib.digest, calib.record(), "layerwise", request.seed)
        keep_statistics(checkpoints, stats)
    scores = scorer.score(stats, params, None)
    protected: dict[int, list[int]] = {}
    if protect_super_experts:
        num_layers = getattr(info.config, "num_hidden_layers", max(stats.header.moe_layers) + 1)
        protected = find_super_experts({layer: stats.get("max_act", layer) for layer in stats.header.moe_layers},
                                       num_layers)

    sens = measure_sensitivity(model, adapter, batches, widths, request, progress, reader, checkpoints)
    costs = joint_costs(sens.costs(request.alpha, request.beta),
                        drop_costs(scores, sens.drop_costs(request.alpha, request.beta)))
    check_finite_costs(costs)
    rules = PruneRules(feasible_kept=tuple(feasible_counts(shape)),
                       n_group=shape.groups[0] if shape.groups else 1, protected=protected)
    allocation = allocate(costs, sizes, choices, budget,
                          rules=AllocationRules(scope="global", require_top=request.require_top, prune=rules),
                          solving=SolverOptions(time_limit=request.time_limit))
    allocation = distributed.broadcast_object(allocation)  # under torchrun every rank follows rank 0's choice

    keep = {layer: [e for e, w in enumerate(ws) if w != DROP] for layer, ws in allocation.widths.items()}
    dropped = {layer: [e for e, w in enumerate(ws) if w == DROP] for layer, ws in allocation.widths.items()}
    kept_widths = {layer: [w for w in ws if w != DROP] for layer, ws in allocation.widths.items()}
    log.info("joint program: %d of %d experts kept per layer (%s, %s)", len(next(iter(keep.values()))),
             len(next(iter(allocation.widths.values()))), allocation.solver, allocation.status)
    if any(dropped.values()):
        model, reader = _drop_experts(model, adapter, reader, keep, source, request.dtype)
        if reader is None:
            model.to(device)
    pruned_targets = find_targets(model, adapter)
    allocation_record: dict[str, object] = {
        "solver": allocation.solver, "status": allocation.status, "gap": allocation.gap,
        "seconds": round(allocation.seconds, 3), "objective": allocation.objective, "scope": "global (joint)",
        "variables": allocation.variables, "kept_per_layer": len(next(iter(keep.values()))),
    }
    plan = make_plan(pruned_targets, adapter, kept_widths, request.settings,
                     PlanHeader(f"joint ({prune_method} + {request.method})", widths, budget_record,
                                allocation=allocation_record, dropped=dropped))
    extra = {"pruning": {"method": prune_method, "params": params.model_dump(), "keep": keep, "dropped": dropped,
                         "protected": protected, "stats_digest": stats.digest()}}
    job = QuantizeJob(source, info, model, adapter, reader=reader, batches=batches, calib=calib, tokenizer=tokenizer,
                      out_dtype=out_dtype, checkpoints=checkpoints)
    result = write_quantized(job, plan, output, request, force, progress, operation="compress", extra_manifest=extra)
    result.allocation = allocation
    return result, allocation


def _drop_experts(model: torch.nn.Module, adapter: Any, reader: Any, keep: dict[int, list[int]], source: Path,
                  dtype: str) -> tuple[torch.nn.Module, Any]:
    """The model with only the `keep` experts, and its reader (None for a model in memory).

    A checkpoint read layer by layer gets a reader that serves only the kept experts; an
    architecture whose adapter drops experts with its own code is loaded and dropped whole.
    """
    from moecompress.models.load import load_model
    from moecompress.io.expert_copy import ExpertCopyUnsupported

    if reader is not None:
        count = len(next(iter(keep.values())))
        try:
            pruned = reader.with_experts(keep, adapter.patched_config(reader.config, num_experts=count))
            return pruned.model, pruned
        except ExpertCopyUnsupported as reason:
            log.info("dropping experts on the whole model: %s", reason)
            model, _ = load_model(source, dtype=dtype)
    return adapter.drop(model, keep_experts=keep), None
