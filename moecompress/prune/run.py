"""Expert pruning end to end: statistics -> scores -> plan -> smaller checkpoint.

`plan_pruning` needs only the config and statistics (plus a `ScoringContext` for model-based
scorers such as NAEE); `prune_checkpoint` validates every request that needs no model first,
then calibrates (or reuses --stats), scores, selects, optionally measures NAEE dynamic-skip
thresholds, and writes the checkpoint (`moecompress.prune.materialize`) and, for PreMoe,
the expert patterns used by `route-task` (`moecompress.prune.patterns`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecompress.calibration.stats import RoutingStats
from moecompress.engine import distributed
from moecompress.engine.resume import RunCheckpoints, source_fingerprint
from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter
from moecompress.prune.merge import (DEFAULT_MERGE, MERGE_STATISTICS, check_merge_request, check_merge_statistics,
                                     plan_merges)
from moecompress.prune.neurons import check_neuron_ratio, select_neurons_global, select_neurons_uniform
from moecompress.prune.plan import PrunePlan
from moecompress.prune.request import PruneRequest
from moecompress.prune.scorers import Scorer, ScoringContext, get_scorer
from moecompress.prune.select import RoutingShape, kept_count, select_global, select_uniform
from moecompress.prune.sequential import SequentialChoice, check_same_choice, check_scoring
from moecompress.prune.super_experts import find_super_experts
from moecompress.sizes import skeleton_model

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "global")


def routing_shape(adapter: MoEAdapter, config: Any) -> RoutingShape:
    """The router facts selection needs, from the adapter and config."""
    return RoutingShape(
        num_experts=adapter.num_experts(config),
        top_k=adapter.top_k(config),
        groups=adapter.groups(config),
        min_kept_per_group=getattr(adapter, "min_kept_per_group", 1),
    )


def required_statistics(method: str, protect_super_experts: bool, params: dict[str, Any] | None = None,
                        merge: str = DEFAULT_MERGE) -> list[str]:
    """Statistics calibration must collect for `method` (plus max_act for super-expert protection, mean_output
    for merging)."""
    needs = list(get_scorer(method).statistics(params))
    extra = ["count"] + (["max_act"] if protect_super_experts else []) + (list(MERGE_STATISTICS) if merge != "none"
                                                                          else [])
    needs += [name for name in extra if name not in needs]
    return needs


def default_allocation(scorer: Scorer) -> str:
    """uniform for expert scorers (loads in transformers), global for neuron scorers (HEAPr's ranking)."""
    return "global" if scorer.granularity == "neuron" else "uniform"


def check_allocation(allocation: str | None, scorer: Scorer, shape: RoutingShape) -> str:
    """The allocation to use; group-limited routers cannot drop a different count per layer."""
    allocation = allocation or default_allocation(scorer)
    if allocation not in ALLOCATIONS:
        raise MoecompressError(f"--allocation must be one of {', '.join(ALLOCATIONS)} (got {allocation!r})")
    if allocation == "global" and scorer.granularity == "expert" and shape.groups is not None:
        raise MoecompressError("global (non-uniform) allocation is not available for group-limited routers: drops must "
                               "be equal per group; use --allocation uniform")
    return allocation


def check_new_top_k(new_top_k: int | None, shape: RoutingShape, kept: int) -> None:
    """A requested top-k must be >= 1, <= the experts kept, and reachable through the groups."""
    if new_top_k is None:
        return
    if not 1 <= new_top_k <= kept:
        raise MoecompressError(f"--top-k must be between 1 and the {kept} experts kept per layer (got {new_top_k})")
    if shape.groups is not None:
        n_group, topk_group = shape.groups
        if topk_group * (kept // n_group) < new_top_k:
            raise MoecompressError(f"--top-k {new_top_k} exceeds topk_group={topk_group} x {kept // n_group} experts "
                                   "kept per group")


def protected_experts(stats: RoutingStats, config: Any, protect: bool) -> dict[int, list[int]]:
    """Super experts per layer (empty when protection is off)."""
    if not protect:
        return {}
    if not stats.has("max_act"):
        raise MoecompressError("super-expert protection needs the max_act statistic; re-run calibrate or pass "
                               "--no-protect-super-experts")
    num_layers = getattr(config, "num_hidden_layers", max(stats.header.moe_layers) + 1)
    return find_super_experts({layer: stats.get("max_act", layer) for layer in stats.header.moe_layers}, num_layers)


def plan_pruning(stats: RoutingStats, adapter: MoEAdapter, config: Any, request: PruneRequest,
                 context: ScoringContext | None = None, scores: dict[int, torch.Tensor] | None = None,
                 protected: dict[int, list[int]] | None = None) -> PrunePlan:
    """Score with `request.method` and choose what each layer keeps (experts, or neurons for neuron scorers).

    request.allocation: "uniform" (same count per layer / same width per expert) or "global"
    (one threshold across layers); default per scorer. `scores` skips scoring (precomputed).
    protected: the super experts to keep (default: found in `stats` when protection is on);
    request.scoring: how `stats` were observed ("one-pass" or "sequential"), recorded in the
    plan. request.merge: "centroid" or "cluster" folds the removed experts into the kept ones
    (`moecompress.prune.merge`; needs the mean_output statistic), "none" drops them.
    """
    method, ratio, keep, domain = request.method, request.ratio, request.keep, request.domain
    scoring, merge, new_top_k = request.scoring, request.merge, request.new_top_k
    scorer = get_scorer(method)
    parsed = scorer.parse_params(request.params)
    shape = routing_shape(adapter, config)
    allocation = check_allocation(request.allocation, scorer, shape)
    check_merge_request(merge, scorer.granularity, allocation, scoring)
    if domain is not None and domain not in stats.header.domains:
        raise MoecompressError(f"--domain {domain!r} is not a calibration domain; have: {', '.join(stats.header.domains)}")
    if protected is None:
        protected = protected_experts(stats, config, request.protect_super_experts)
    if scorer.granularity == "neuron":
        fraction = check_neuron_ratio(ratio, keep)
        if scores is None:
            scores = scorer.score(stats, parsed, domain, context)
        if allocation == "uniform":
            neurons = select_neurons_uniform(scores, fraction)
        else:
            neurons = select_neurons_global(scores, fraction, protected)
        plan = PrunePlan(method=method, params=parsed.model_dump(), granularity="neuron", allocation=allocation,
                         scoring=scoring, domain=domain, num_experts=shape.num_experts, top_k=shape.top_k, new_top_k=new_top_k,
                         keep={layer: list(range(s.shape[0])) for layer, s in scores.items()}, protected=protected,
                         intermediate_size=stats.header.intermediate_size)
        plan.set_neurons(neurons)
        return plan
    count = kept_count(shape, ratio=ratio, keep=keep)
    check_new_top_k(new_top_k, shape, count if allocation == "uniform" else shape.top_k)
    if scores is None:
        if context is not None:  # the scorer's view of this plan; the caller's context is left as it was
            context = dataclasses.replace(context, shape=shape, protected=protected,
                                          keep=count if allocation == "uniform" else None)
        scores = scorer.score(stats, parsed, domain, context)
    if allocation == "uniform":
        kept = select_uniform(scores, shape, count, protected)
    else:
        kept = select_global(scores, shape, count, protected)
    merged: dict[int, list[list[int]]] = {}
    weights: dict[int, list[list[float]]] = {}
    if merge != "none":
        kept, merged, weights = plan_merges(stats, merge, scores, kept, shape, count, protected, domain)
    return PrunePlan(method=method, params=parsed.model_dump(), allocation=allocation, scoring=scoring, domain=domain,
                     num_experts=shape.num_experts, top_k=shape.top_k, new_top_k=new_top_k, keep=kept,
                     protected=protected, scores={layer: [round(float(v), 8) for v in s] for layer, s in scores.items()},
                     merge=merge, merged=merged, merge_weights=weights)


@dataclass
class PruneResult:
    """What `prune_checkpoint` did."""

    plan: PrunePlan
    output: Path | None
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    format: str | None = None  # "transformers" or "moecompress-layout"
    notice: str | None = None  # said at write time when the output needs moecompress.load
    patterns: Path | None = None


def _expert_sizes(adapter: MoEAdapter, model: Any) -> tuple[int, int]:
    """(parameters removed with one routed expert, parameters per intermediate neuron).

    An expert takes its weights and its router row, router bias and correction-bias entries
    with it (those that are parameters; buffers are not counted as parameters).
    """
    from torch import nn

    from moecompress.models.tensors import get_tensor

    layer = adapter.moe_layers(model)[0]
    expert = adapter.expert_weights(layer, 0)
    parts = [expert.gate, expert.up, expert.down, expert.gate_bias, expert.up_bias, expert.down_bias]
    per_neuron = [expert.gate, expert.up, expert.down, expert.gate_bias, expert.up_bias]
    width = expert.intermediate_size
    routing = 0
    if isinstance(get_tensor(model, f"{layer.router_path}.{adapter.router_weight_attr}"), nn.Parameter):
        routing += adapter.router_weight(layer.router).shape[-1]  # one (H,) row per expert
    keys = [f"{layer.path}.{path}" for path in adapter.correction_bias_paths]
    if adapter.router_bias_attr is not None:
        keys.append(f"{layer.router_path}.{adapter.router_bias_attr}")
    for key in keys:
        tensor = get_tensor(model, key)
        if isinstance(tensor, nn.Parameter):
            routing += tensor.numel() // layer.num_experts
    expert_numel = sum(p.numel() for p in parts if p is not None) + routing
    return expert_numel, sum(p.numel() for p in per_neuron if p is not None) // width


def params_after(plan: PrunePlan, params_before: int, adapter: MoEAdapter, model: Any) -> int:
    """Parameters of the pruned model (padding of in-memory layouts not counted)."""
    expert_numel, neuron_numel = _expert_sizes(adapter, model)
    removed_experts = sum(plan.num_experts - n for n in plan.kept_counts().values())
    removed_neurons = 0
    if plan.widths and plan.intermediate_size:
        removed_neurons = sum(plan.intermediate_size - w for per in plan.widths.values() for w in per)
    return params_before - removed_experts * expert_numel - removed_neurons * neuron_numel


def check_width_storable(info: Any, ratio: float | None) -> None:
    """Uniform neuron pruning of an FP8 / MXFP4 checkpoint keeps a width made of whole blocks of its format."""
    from moecompress.models.weight_format import width_multiple
    from moecompress.sizes import skeleton_model

    multiple = width_multiple(info.stored_format)
    if multiple == 1 or ratio is None:
        return
    skeleton = skeleton_model(info.config)
    refs = info.adapter.moe_layers(skeleton)
    if not refs:
        return
    width = info.adapter.expert_weights(refs[0], 0).intermediate_size
    kept = max(1, int(round(width * (1.0 - ratio))))
    if kept % multiple:
        choices = [f"{1 - m / width:g}" for m in range(multiple, width, multiple)][-3:]
        raise MoecompressError(
            f"--ratio {ratio:g} keeps {kept} of {width} neurons per expert, but the checkpoint is stored in "
            f"{info.stored_format.describe()} and a changed width must be a multiple of {multiple}; "
            f"use --ratio {' or '.join(choices) if choices else 'with whole blocks'}")


def _validate(source: Path, output: str | Path | None, request: PruneRequest, stats: RoutingStats | None,
              dry_run: bool, force: bool) -> tuple[Any, Scorer, str]:
    """Every check that needs no model; returns (checkpoint info, scorer, allocation)."""
    from moecompress.io.provenance import config_hash

    method, ratio, keep, params, domain = request.method, request.ratio, request.keep, request.params, request.domain
    new_top_k, patterns, dynamic_skip = request.new_top_k, request.patterns, request.dynamic_skip
    from moecompress.io.output import check_output_dir
    from moecompress.models.load import inspect_checkpoint

    if not dry_run and output is None and patterns is None:
        raise MoecompressError("pass -o/--output for the pruned checkpoint (or --dry-run)")
    if not dry_run and output is not None:
        check_output_dir(output, force, inputs=(source,))
    info = inspect_checkpoint(source)
    adapter, config = info.adapter, info.config
    scorer = get_scorer(method)
    scorer.parse_params(params)
    shape = routing_shape(adapter, config)
    allocation = check_allocation(request.allocation, scorer, shape)
    if scorer.granularity == "neuron":
        check_neuron_ratio(ratio, keep)
        if allocation == "uniform":
            adapter.check_width_patchable(config)
            check_width_storable(info, ratio)
        if new_top_k is not None:
            check_new_top_k(new_top_k, shape, shape.num_experts)
    else:
        count = kept_count(shape, ratio=ratio, keep=keep)
        check_new_top_k(new_top_k, shape, count if allocation == "uniform" else shape.top_k)
    check_scoring(request.scoring, scorer, scorer.parse_params(params), allocation, adapter, dynamic_skip, patterns)
    check_merge_request(request.merge, scorer.granularity, allocation, request.scoring, dynamic_skip, patterns)
    if stats is not None:
        check_merge_statistics(stats, request.merge)
    if dynamic_skip:
        top_k = new_top_k if new_top_k is not None else shape.top_k
        if top_k != 2:
            raise MoecompressError(f"--dynamic-skip is defined for top-2 routers; this output routes to top-{top_k}")
    if patterns is not None:
        if method != "premoe":
            raise MoecompressError("--patterns stores PreMoe expert patterns: use --method premoe")
        if allocation != "uniform":
            raise MoecompressError("--patterns needs --allocation uniform (one kept count per layer)")
        if Path(patterns).exists() and not force and not dry_run:
            raise MoecompressError(f"patterns file {str(patterns)!r} exists; pass --force to replace it")
    if stats is not None:
        if stats.header.config_hash != config_hash(config):
            raise MoecompressError("--stats were collected on a different model; re-run calibrate on this checkpoint")
        if domain is not None and domain not in stats.header.domains:
            raise MoecompressError(f"--domain {domain!r} is not a domain of --stats; have: {', '.join(stats.header.domains)}")
    elif domain is not None:
        from moecompress.calibration.data import default_calibration_sources

        names = [item.name for item in (request.sources or default_calibration_sources())]
        if domain not in names:
            raise MoecompressError(f"--domain {domain!r} is not a calibration domain; have: {', '.join(names)}")
    return info, scorer, allocation


def prune_checkpoint(checkpoint: str | Path, output: str | Path | None, request: PruneRequest,
                     stats: RoutingStats | None = None, dry_run: bool = False, force: bool = False,
                     progress: bool = True, resume: bool = False) -> PruneResult:
    """Calibrate (or reuse `stats`), score, select and write a pruned checkpoint to `output`.

    Every check that needs no model (method, parameters, ratio feasibility, allocation, output
    folder, stats identity) runs before any model work. The input checkpoint is never
    modified; the output is written to a temporary sibling and renamed into place when
    complete. `patterns` (PreMoe) also writes one expert pattern per calibration domain.

    Methods that score from statistics alone calibrate through the layer engine (one decoder
    layer in memory at a time, on `device`, in `dtype`; `auto` is the checkpoint's; a MoE layer
    larger than `max_memory` leaves in expert groups), and a
    uniform expert plan is written by copying tensors, so neither step holds the model.
    Checkpoints of the run are kept beside `output` (`moecompress.engine.resume`): the
    calibration pass after every layer, then the statistics; `resume` continues a killed run
    of the same command from them (scoring and writing start over).
    scoring: "one-pass" scores every layer on the unpruned model; "sequential" scores and
    prunes each layer on the outputs of the already-pruned layers before it
    (`moecompress.prune.sequential`; statistics-only expert scorers, uniform allocation). With
    `stats` given, sequential scoring still observes every layer again and takes only the
    super experts from `stats`.
    merge: "centroid" or "cluster" folds each removed expert into a kept one
    (`moecompress.prune.merge`); the calibration pass then also runs every expert on every
    token (the mean_output statistic).
    """
    source = Path(checkpoint)
    info, scorer, allocation = _validate(source, output, request, stats, dry_run, force)
    request = request.model_copy(update={"allocation": allocation})
    writes = not dry_run and output is not None
    checkpoints = RunCheckpoints(output, "prune", resume=resume) if writes else RunCheckpoints.disabled()
    with checkpoints:
        options = request.fingerprint()
        options["stats"] = None if stats is None else stats.header.model_dump(mode="json")
        checkpoints.require("options", options)
        checkpoints.require("input checkpoint", source_fingerprint(source))
        adapter, config = info.adapter, info.config
        parsed = scorer.parse_params(request.params)
        needs = required_statistics(request.method, request.protect_super_experts, request.params, request.merge)
        needs_model = scorer.uses_model(parsed) or request.dynamic_skip
        protected = chosen = None
        if request.scoring == "sequential":
            model = tokenizer = context = None
            stats, protected, chosen = _calibrated_sequentially(source, stats, scorer, info, request, progress,
                                                                checkpoints)
        else:
            model, tokenizer, context, stats = _calibrated(source, stats, needs, needs_model, request, progress,
                                                           checkpoints)
        plan = plan_pruning(stats, adapter, config, request, context=context, protected=protected)
        if chosen is not None:
            check_same_choice(chosen, plan.keep)
        if request.dynamic_skip:
            from moecompress.prune.dynamic_skip import measure_betas

            keep_masked = plan.keep if plan.granularity == "expert" else None
            plan.dynamic_skip, plan.skip_fraction = measure_betas(model, adapter, context.batches, keep_masked,
                                                                  progress)
        skeleton = model if model is not None else skeleton_model(config)
        before = sum(p.numel() for p in skeleton.parameters())
        after = params_after(plan, before, adapter, skeleton)
        patterns_path = None
        if not dry_run:
            # under torchrun every rank has the same (reduced) statistics and plan: what is written below is
            # written by rank 0 alone, after every rank has passed its checks, and every rank returns its result
            distributed.initialise(request.device)  # a no-op in one process, or when calibrate joined the ranks
        if request.patterns is not None:
            from moecompress.prune.patterns import build_patterns, save_patterns

            built = build_patterns(stats, adapter, config, source, request, context=context)
            patterns_path = None if dry_run else distributed.writer_only(
                lambda: save_patterns(built, request.patterns), "writing the expert patterns")
        if dry_run or output is None:
            estimate = int(info.bytes_on_disk * after / max(before, 1))
            return PruneResult(plan, None, before, after, info.bytes_on_disk, estimate, patterns=patterns_path)
        from moecompress.io.checkpoint import folder_bytes

        def write() -> tuple[Any, int]:
            written = _write((model, tokenizer), info, plan, output, stats, request, force, progress)
            return written, folder_bytes(written.path)

        written, written_bytes = distributed.writer_only(write, "writing the pruned checkpoint")
        return PruneResult(plan, written.path, before, after, info.bytes_on_disk, written_bytes,
                           format=written.format, notice=written.notice, patterns=patterns_path)


SUPER_EXPERT_STATISTICS = "super-expert statistics"  # the one-pass max_act a sequential run protects from


def _calibrated_sequentially(source: Path, stats: RoutingStats | None, scorer: Scorer, info: Any,
                             request: PruneRequest, progress: bool, checkpoints: RunCheckpoints
                             ) -> tuple[RoutingStats, dict[int, list[int]], dict[int, list[int]]]:
    """(statistics of a sequential calibration pass, protected super experts, experts the pass kept per layer).

    With protection on, the super experts come from `stats` or from a one-pass observation of
    max_act first. Resumed runs take back both passes' saved results (the layers a resumed
    pass kept before the interruption are not among the experts returned).
    """
    from moecompress.calibration.calibrate import calibrate, keep_statistics, resumed_statistics

    config = info.config
    shape = routing_shape(info.adapter, config)
    protected: dict[int, list[int]] = {}
    if request.protect_super_experts:
        found = stats
        if found is None:
            saved = checkpoints.result(SUPER_EXPERT_STATISTICS)
            if saved is not None:
                log.warning("reusing the super experts found before the interruption (in %s)", saved)
                found = RoutingStats.load(saved)
        if found is None:
            found = calibrate(source, request.calibration(["count", "max_act"]), progress=progress,
                              checkpoints=checkpoints, pass_name="finding-super-experts")
            checkpoints.save_result(SUPER_EXPERT_STATISTICS, found.save)
        protected = protected_experts(found, config, True)
    choice = SequentialChoice(scorer, scorer.parse_params(request.params), shape,
                              kept_count(shape, ratio=request.ratio, keep=request.keep), request.domain, protected)
    sequential = resumed_statistics(checkpoints)
    if sequential is None:
        sequential = calibrate(source, request.calibration(required_statistics(scorer.name, False, request.params)),
                               progress=progress, checkpoints=checkpoints, choose_experts=choice)
        keep_statistics(checkpoints, sequential)
    return sequential, protected, choice.kept


def _calibrated(source: Path, stats: RoutingStats | None, needs: list[str], needs_model: bool,
                request: PruneRequest, progress: bool, checkpoints: RunCheckpoints
                ) -> tuple[Any, Any, ScoringContext | None, RoutingStats]:
    """(model, tokenizer, scoring context, statistics): the model only for scorers that use it.

    Statistics come from `stats`, the run's saved result (a resumed run), or a calibration
    pass, whose result is saved among the run's checkpoints.
    """
    from moecompress.calibration.calibrate import calibrate, keep_statistics, resumed_statistics

    if stats is None:
        stats = resumed_statistics(checkpoints)
    model = tokenizer = context = None
    given = stats is not None
    if needs_model:
        model, tokenizer, context, stats = _load_and_calibrate(source, stats, needs, request, progress)
    elif stats is None:
        stats = calibrate(source, request.calibration(needs), progress=progress, checkpoints=checkpoints)
    if not given:
        keep_statistics(checkpoints, stats)
    return model, tokenizer, context, stats


def _load_and_calibrate(source: Path, stats: RoutingStats | None, needs: list[str], request: PruneRequest,
                        progress: bool) -> tuple[Any, Any, ScoringContext, RoutingStats]:
    """Load the whole model once, build the calibration batches, and collect statistics unless given."""
    from moecompress.calibration.calibrate import build_stats, collect_statistics
    from moecompress.calibration.request import ObservedPass
    from moecompress.calibration.data import build_calibration_set, default_calibration_sources
    from moecompress.models.load import load_model, load_tokenizer

    samples, seed, batch_size, dtype = request.samples, request.seed, request.batch_size, request.dtype
    tokenizer = load_tokenizer(source)
    calib = build_calibration_set(tokenizer, list(request.sources) if request.sources else
                                  default_calibration_sources(), num_samples=samples, seq_len=request.seq_len,
                                  seed=seed)
    model, adapter = load_model(source, dtype=dtype)
    if stats is None:
        # the whole model is in memory anyway (it is needed to write the output), so observe
        # ordinary forward passes: same statistics as layer-at-a-time, and every architecture
        # runs (GLM-MoE-DSA and HY-V4 thread extra outputs between layers)
        mode = "whole-model"
        torch.manual_seed(seed)
        observer = collect_statistics(model, adapter, calib.input_ids, calib.domain_ids, calib.domains,
                                      ObservedPass(statistics=needs, batch_size=batch_size, mode=mode), progress)
        data = {"sources": calib.sources, "seq_len": calib.seq_len, "num_samples_per_domain": samples, "seed": seed,
                "batch_size": batch_size, "dtype": dtype}
        stats = build_stats(model, observer, source, calib.digest, data, mode, seed)
    context = ScoringContext(model=model, adapter=adapter, batches=list(calib.domain_batches(batch_size)), seed=seed,
                             progress=progress)
    return model, tokenizer, context, stats


def _write(loaded: tuple[Any, Any], info: Any, plan: PrunePlan, output: str | Path, stats: RoutingStats,
           request: PruneRequest, force: bool, progress: bool) -> Any:
    """Write the pruned checkpoint (`materialize.Written`).

    A uniform expert plan, or a neuron plan with every expert at one width, is written by
    copying the kept tensors from the input shards (no model in memory); other plans (per-layer
    counts or widths) and layouts the copy cannot express are materialised on the whole model.
    """
    from moecompress.io.manifest import build_manifest
    from moecompress.io.expert_copy import ExpertCopyUnsupported
    from moecompress.prune.materialize import write_pruned, write_pruned_by_copy

    model, tokenizer = loaded
    source, dtype = Path(info.path), request.dtype
    adapter, config = info.adapter, info.config
    manifest = build_manifest("prune", plan.method, plan.params, request.seed, source, config, stats,
                              plan=plan.model_dump(exclude={"scores"}))
    copyable = plan.uniform if plan.granularity == "expert" else plan.allocation == "uniform"
    if copyable:
        try:
            return write_pruned_by_copy(info, plan, output, manifest, force=force, progress=progress)
        except ExpertCopyUnsupported as reason:
            log.info("writing through the whole model: %s", reason)
    if model is None:
        from moecompress.models.load import load_model, load_tokenizer

        model, _ = load_model(source, dtype=dtype)
        tokenizer = load_tokenizer(source)
    return write_pruned(model, adapter, plan, tokenizer, output, manifest, source, force=force)
