"""The calibration pass: calibration data -> one observed forward -> `RoutingStats`.

Two equivalent modes:

* ``layerwise`` (default): the decoder runs one layer at a time over cached hidden states
  (`LayerEngine`), each layer read from the checkpoint files only while it runs
  (`CheckpointReader`), in the checkpoint's dtype unless told otherwise, so peak memory is
  one layer plus activations;
* ``whole-model``: an ordinary forward per batch with the whole model in memory.

Both give the same statistics (tested). The gradient statistic (HEAPr's neuron_grad_proj)
needs the loss's backward pass: layer by layer it runs through `moecompress.engine.backward`
(a forward that keeps every layer's input, then each layer recomputed and backpropagated,
last layer first, observed while it is), so it too holds one layer at a time; that pass
starts over when resumed.

Sequential calibration (``choose_experts``, layer by layer only): as soon as MoE layer L has
been observed, a callback chooses the experts it keeps from L's statistics, and L runs again
with its router restricted to them (`MoEAdapter.mask_experts`, exact removal) to produce layer
L+1's inputs. Each layer is then observed on the outputs of the already-pruned layers before
it, as llm-compressor's REAP modifier scores; it costs a second run of every MoE layer.

Data parallel: under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) `calibrate` splits
the calibration batches round-robin across the ranks (`moecompress.engine.distributed`), each
rank observing only its share (its layer engine caches only those batches' hidden states),
then all-reduces every statistic, so each rank ends with the statistics of a single process
(up to float64 summation order). The calibration set, its digest, the seed and the header are
the single process's; the header's ``data`` records ``world_size``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from moecompress.calibration.gradients import activation_gradients
from moecompress.engine import distributed
from moecompress.engine.layers import LayerEngine
from moecompress.engine.memory import default_budget, format_gib, parse_memory
from moecompress.engine.reader import CheckpointReader
from moecompress.engine.resume import LayerPassCheckpoints, RunCheckpoints, source_fingerprint
from moecompress.engine.spill import SpilledActivations
from moecompress.engine.working_memory import layer_working_bytes
from moecompress.calibration.observer import GRADIENT_STATISTICS, Observer, validate_statistics
from moecompress.calibration.request import CalibrationRequest, ExpertChoice, ObservedPass
from moecompress.calibration.stats import RoutingStats, StatsHeader
from moecompress.io.provenance import config_hash, library_versions
from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter
from moecompress.models.load import text_config

log = logging.getLogger(__name__)

MODES = ("layerwise", "whole-model")



def _batches(input_ids: torch.Tensor, domain_ids: torch.Tensor, domains: Sequence[str], batch_size: int
             ) -> list[tuple[str, torch.Tensor]]:
    """Single-domain batches (domain, (B, S)) in domain order, then sample order."""
    out = []
    for d, name in enumerate(domains):
        rows = input_ids[domain_ids == d]
        for start in range(0, rows.shape[0], batch_size):
            out.append((name, rows[start : start + batch_size]))
    return out


def collect_statistics(model: nn.Module, adapter: MoEAdapter, input_ids: torch.Tensor, domain_ids: torch.Tensor,
                       domains: Sequence[str], options: ObservedPass | None = None, progress: bool = True
                       ) -> Observer:
    """Observe the model on input_ids (N, S) with per-sample domain_ids (N,); returns the filled Observer.

    options (`ObservedPass`; default: the default statistics, layer by layer, in memory):
    statistics and batch_size: what is observed, in batches of that many windows; mode:
    layerwise or whole-model; reader: the checkpoint the (meta-device) model is read from, one layer at a time
    (layerwise mode only); device: where layers compute (default: where the model is);
    max_layer_bytes: MoE layers larger than this compute their experts in groups (`LayerEngine`).
    data_parallel: inside a process group (`distributed.initialise`), observe only this rank's
    round-robin share of the batches, then all-reduce (`Observer.all_reduce`) so every rank
    returns the statistics of all batches. Collective then: every rank calls it with the same
    arguments, and a failure on one rank ends every rank (`distributed.phase`). Without a
    process group (or with False) the call observes every batch and communicates nothing.
    checkpoints: where the layer-by-layer pass saves its progress after each layer, and
    resumes from (`moecompress.engine.resume`; default none); unused in whole-model mode.
    spill_to: keep the cached hidden states in memory-mapped files in a folder made there
    (`moecompress.engine.spill`), removed after the pass; None keeps them in memory.
    choose_experts: calibrate sequentially (see the module docstring): called once per MoE
    layer, in order, with the layer's statistics (all-reduced first when data parallel, so
    every rank chooses the same); the returned experts are the only ones the layer routes to
    when it produces the next layer's inputs. Layer by layer only.
    """
    options = options or ObservedPass()
    parallel = options.data_parallel and distributed.active()
    if options.choose_experts is not None and options.mode != "layerwise":
        raise MoecompressError("sequential calibration runs one layer at a time: it needs mode 'layerwise'")
    with distributed.phase("calibrating") if parallel else contextlib.nullcontext():
        observer = _observe(model, adapter, (input_ids, domain_ids, domains), options, progress, parallel)
    if parallel:
        observer.all_reduce()
    return observer


def _observe(model: nn.Module, adapter: MoEAdapter, windows: tuple[torch.Tensor, torch.Tensor, Sequence[str]],
             options: ObservedPass, progress: bool, parallel: bool) -> Observer:
    """`collect_statistics` on this process: every batch, or this rank's share when `parallel`.

    windows: (input_ids (N, S), domain_ids (N,), domain names).
    """
    input_ids, domain_ids, domains = windows
    mode, reader, choose_experts = options.mode, options.reader, options.choose_experts
    checkpoints = options.checkpoints or LayerPassCheckpoints(None, "calibrating")
    if mode not in MODES:
        raise MoecompressError(f"unknown calibration mode {mode!r}; use one of {', '.join(MODES)}")
    statistics = validate_statistics(options.statistics)
    needs_grad = any(name in GRADIENT_STATISTICS for name in statistics)
    if needs_grad and choose_experts is not None:
        raise MoecompressError("gradient statistics (neuron_grad_proj) come from a backward pass over the whole "
                               "decoder, which sequential calibration cannot interleave; calibrate in one pass")
    if mode == "layerwise" and not adapter.layerwise_supported:
        raise MoecompressError(f"{model.config.model_type} cannot run one layer at a time; use mode 'whole-model'")
    if reader is not None and mode != "layerwise":
        raise MoecompressError("a checkpoint read layer by layer can only be calibrated in mode 'layerwise'")
    spill = (SpilledActivations(options.spill_to) if options.spill_to is not None and mode == "layerwise"
             else None)
    engine = LayerEngine(model, adapter, reader=reader, device=options.device, max_layer_bytes=options.max_layer_bytes,
                         spill=spill)
    observer = Observer(model, adapter, domains, statistics, device=engine.device)
    batches = _batches(input_ids, domain_ids, domains, options.batch_size)
    if parallel:
        world = distributed.world_size()
        if len(batches) < world and distributed.is_writer():
            log.warning("%d calibration batches for %d processes: %d of them have nothing to observe; lower "
                        "--batch-size to give every process a batch", len(batches), world, world - len(batches))
        batches = distributed.shard(batches)
        progress = progress and distributed.is_writer()
        if not batches:
            if spill is not None:
                spill.close()
            if choose_experts is not None:  # the per-layer reductions are collective: take part, choose alike
                for ref in observer.layers:
                    observer.all_reduce(layers=[ref.index])
                    choose_experts(ref.index, observed_layer(observer, ref.index))
            return observer  # a rank without a batch contributes zeros (and loads no layer)
    try:
        if mode == "whole-model":
            _whole_model_pass(model, observer, batches, needs_grad, progress)
        elif needs_grad:
            _layerwise_backward_pass(engine, observer, batches, progress)
        else:
            _layerwise_pass(engine, observer, batches, progress, checkpoints, choose_experts)
    finally:
        if spill is not None:
            engine.batches.clear()  # the mapped tensors go before their files
            spill.close()
    return observer


def _whole_model_pass(model: nn.Module, observer: Observer, batches: list[tuple[str, torch.Tensor]],
                      needs_grad: bool, progress: bool) -> None:
    with activation_gradients(model, enabled=needs_grad), observer.active():
        for domain, ids in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
            observer.set_domain(domain)
            if needs_grad:
                with torch.enable_grad():
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    loss.backward()
            else:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)


def _layerwise_pass(runner: LayerEngine, observer: Observer, batches: list[tuple[str, torch.Tensor]],
                    progress: bool, checkpoints: LayerPassCheckpoints,
                    choose_experts: ExpertChoice | None = None) -> None:
    runner.prepare(batches)
    total = len(runner.layers)
    restored = checkpoints.restore(runner, total)
    observer.restore_layers(restored.layers, restored.state.get("tokens", {}))
    moe_indices = {ref.index for ref in observer.layers}
    desc = checkpoints.name.replace("-", " ") + (", pruning each layer" if choose_experts is not None else "")
    with tqdm(total=total, initial=restored.next_layer, desc=desc, unit="layer", disable=not progress) as bar:
        for index in range(restored.next_layer, total):
            if index in moe_indices and choose_experts is not None:
                _sequential_layer(runner, observer, index, choose_experts)
            elif index in moe_indices:
                with observer.active(layers=[index]):
                    runner.run_layer(index, before_batch=observer.set_domain)
            else:
                runner.run_layer(index)
            checkpoints.save(runner, index, observer.layer_tensors(index) if index in moe_indices else None,
                             {"tokens": observer.token_counts()})
            bar.update(1)


def _layerwise_backward_pass(engine: LayerEngine, observer: Observer, batches: list[tuple[str, torch.Tensor]],
                             progress: bool) -> None:
    """Observe every MoE layer while the loss's backward pass recomputes it (forward and gradient statistics)."""
    from moecompress.engine.backward import stream_backward

    moe_indices = {ref.index for ref in observer.layers}

    def observed(index: int) -> contextlib.AbstractContextManager:
        return observer.active(layers=[index]) if index in moe_indices else contextlib.nullcontext()

    stream_backward(engine, batches, observed, before_batch=observer.set_domain, progress=progress,
                    desc="calibrating with gradients")


def _sequential_layer(runner: LayerEngine, observer: Observer, index: int, choose_experts: ExpertChoice) -> None:
    """Observe MoE layer `index`, let `choose_experts` pick its experts, and run it again routed to those only."""
    with runner.layer_loaded(index):  # the layer's weights stay loaded for both runs
        with observer.active(layers=[index]):
            runner.run_layer(index, before_batch=observer.set_domain, advance=False)
        observer.all_reduce(layers=[index])  # data parallel: every rank chooses from the same statistics
        kept = list(choose_experts(index, observed_layer(observer, index)))
        with runner.adapter.mask_experts(runner.model, {index: kept}):
            runner.run_layer(index)


def observed_layer(observer: Observer, index: int) -> RoutingStats:
    """MoE layer `index`'s statistics as observed so far, as a one-layer `RoutingStats`.

    What scorers read is complete (tensors, token counts, shapes, domains); the header's
    provenance fields (model path, data digest, seed) are empty: it is never saved.
    """
    return build_stats(observer.model, observer, "", "", {}, "layerwise", 0, layers=[index])


def build_stats(
    model: nn.Module,
    observer: Observer,
    model_path: str | Path,
    data_digest: str,
    data: dict[str, Any],
    mode: str,
    seed: int,
    layers: Sequence[int] | None = None,
) -> RoutingStats:
    """Package an observer's sums with their header (of these MoE layers; default all)."""
    refs = [ref for ref in observer.layers if layers is None or ref.index in layers]
    header = StatsHeader(
        model_type=model.config.model_type,
        config_hash=config_hash(model.config),
        model_path=str(model_path),
        moe_layers=[ref.index for ref in refs],
        num_experts=refs[0].num_experts,
        top_k=refs[0].top_k,
        intermediate_size=observer.observers[refs[0].index].intermediate_size,
        domains=list(observer.domains),
        statistics=list(observer.statistics),
        tokens=observer.token_counts(layers),
        data_digest=data_digest,
        data=data,
        mode=mode,
        seed=seed,
        versions=library_versions(),
    )
    tensors = observer.tensors(layers)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MoecompressError(f"calibration statistic {key} holds NaN or Inf values; the model's activations "
                                   "overflow in this dtype (try --dtype float32) or its weights are corrupt")
    return RoutingStats(header, tensors)


DENSE_LOAD_FACTOR = 1.5  # a layer's weights while they load: the parameters plus the source being converted


def widest_dense_bytes(reader: CheckpointReader) -> int:
    """Bytes the largest decoder layer's weights outside the routed experts take while they load.

    These cannot be split into expert groups (attention, norms, routers, shared experts, and
    whole dense layers such as DeepSeek-V3's first ones).
    """
    moe = {ref.index: ref for ref in reader.adapter.moe_layers(reader.model)}
    widest = 0
    for index in range(len(reader.adapter.decoder_layers(reader.model))):
        keys = reader.layer_keys(index)
        if index in moe:
            try:
                prefix = reader.module_path(moe[index].experts) + "."
            except KeyError:
                prefix = None
            keys = [key for key in keys if prefix is None or not key.startswith(prefix)]
        widest = max(widest, reader.keys_bytes(keys))
    return int(DENSE_LOAD_FACTOR * widest)


def host_budget(max_memory: str | int | None, processes: int = 1) -> int | None:
    """Host bytes a pass may plan with: `max_memory`, or this process's share of the memory available (None: unknown)."""
    if max_memory is not None:
        return parse_memory(max_memory)
    budget = default_budget()
    return None if budget is None else budget // max(1, processes)


def cached_bytes(reader: CheckpointReader, samples: int, seq_len: int) -> int:
    """Bytes of `samples` windows of `seq_len` cached hidden states (float32 at least)."""
    return samples * seq_len * int(text_config(reader.config).hidden_size) * max(reader.dtype.itemsize, 4)


def activation_bytes(reader: CheckpointReader, input_shape: tuple[int, ...], batch_rows: int) -> int:
    """Activations a layer pass holds while a layer runs: the cached states in memory, one batch's output, its working set.

    input_shape: (windows, seq_len) of the cached states held in memory (one batch's when
    they are spilled to files); batch_rows: windows per batch.
    """
    samples, seq_len = int(input_shape[0]), int(input_shape[1])
    rows = max(1, min(int(batch_rows), samples))
    return (cached_bytes(reader, samples, seq_len) + cached_bytes(reader, rows, seq_len)
            + layer_working_bytes(reader, rows, seq_len))


def layer_budget(reader: CheckpointReader, input_shape: tuple[int, ...], max_memory: str | int | None,
                 processes: int = 1, budget: int | None = None, batch_rows: int | None = None) -> int | None:
    """Bytes one decoder layer's weights may occupy: the host budget minus the activations (None: unknown budget).

    The budget is `max_memory`, or a share of the memory available to this process (divided
    among `processes` processes calibrating side by side on this machine); `budget` gives it
    when the caller has it already. The activations (`activation_bytes`, batches of
    `batch_rows` windows, default all of them at once) include the layer's working set
    (`moecompress.engine.working_memory`). A budget that cannot hold the activations, or the
    embeddings while batches are embedded, is refused in one line with what it needs.
    """
    budget = host_budget(max_memory, processes) if budget is None else budget
    if budget is None:
        return None
    activations = activation_bytes(reader, input_shape, int(input_shape[0]) if batch_rows is None else batch_rows)
    left = budget - activations
    outside = reader.new_memory_bytes(reader.outside_layers(include_head=False))  # file-backed views cost nothing
    if left < outside:
        given = "--max-memory" if max_memory is not None else "the memory available"
        raise MoecompressError(
            f"{given} ({format_gib(budget)}) cannot hold the calibration activations ({format_gib(activations)}) "
            f"and the embeddings ({format_gib(outside)}); lower --batch-size, --samples or --seq-len, or raise "
            "--max-memory")
    return left


SPILL_SHARE = 0.5  # cached hidden states taking more of the budget than this go to memory-mapped files


def plan_activations(reader: CheckpointReader, input_shape: tuple[int, ...], batch_size: int,
                     max_memory: str | int | None, processes: int = 1, copies: int = 1) -> tuple[int | None, bool]:
    """(bytes one decoder layer may occupy, whether the cached hidden states are spilled to files).

    The cached states stay in memory while they take at most `SPILL_SHARE` of the budget;
    beyond, they are memory-mapped files (`moecompress.engine.spill`) and only a batch's
    worth of activations is planned in memory (`layer_budget` for one batch). copies: how many
    sets of cached states the pass holds (the backward pass keeps every layer's input and the
    gradients: layers + 1).
    """
    budget = host_budget(max_memory, processes)
    samples, seq_len = int(input_shape[0]), int(input_shape[1])
    cached = copies * cached_bytes(reader, samples, seq_len)
    if budget is None or cached <= SPILL_SHARE * budget:  # unknown budget: nothing to plan with
        return layer_budget(reader, input_shape, max_memory, processes, budget, batch_size), False
    log.warning("the cached hidden states (%s) exceed half the memory budget (%s): they are kept in memory-mapped "
                "files instead", format_gib(cached), format_gib(budget))
    rows = min(batch_size, samples)
    return layer_budget(reader, (rows, seq_len), max_memory, processes, budget, rows), True


class LayerPassPlan(NamedTuple):
    """How a layer-by-layer calibration pass runs within its memory budget."""

    reader: CheckpointReader  # in the dtype the pass computes in
    max_layer_bytes: int | None  # what one loaded layer's weights may take (None: no budget known)
    spill: bool  # the cached hidden states go to memory-mapped files
    batch_size: int  # windows per batch


def plan_layer_pass(model_path: str | Path, info: Any, calib: Any, request: CalibrationRequest, parallel: bool,
                    backward: bool) -> LayerPassPlan:
    """The compute dtype, layer budget, spilling and batch size of a layer pass over the checkpoint at `model_path`.

    info: its `CheckpointInfo`; calib: the `CalibrationSet`; backward: the pass keeps every
    layer's input (gradient statistics).

    `auto` on the CPU computes outside the routed experts in float32 only while those float32
    copies fit the budget, else in the stored dtype. When the widest decoder layer's weights
    outside the routed experts (which cannot be split into expert groups) and one batch's
    working activations do not fit together, the batch size is lowered (with a warning) to the
    largest that fits; when none fits, the run stops in one line with what it needs.
    Data parallel, a rank plans with the activations of its own share of the batches and
    (without --max-memory) its share of the node's memory.
    """
    batch_size = request.batch_size
    reader = CheckpointReader(model_path, dtype=request.dtype, info=info)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if parallel else 1
    copies = len(reader.adapter.decoder_layers(reader.model)) + 1 if backward else 1

    def planned(candidate: CheckpointReader, rows: int) -> tuple[int | None, bool]:
        shape = tuple(calib.input_ids.shape)
        if parallel:
            mine = distributed.shard(_batches(calib.input_ids, calib.domain_ids, calib.domains, rows))
            shape = (sum(ids.shape[0] for _, ids in mine), shape[1])
        return plan_activations(candidate, shape, rows, request.max_memory, processes=local_ranks, copies=copies)

    if host_budget(request.max_memory, local_ranks) is None:
        return LayerPassPlan(reader, None, *planned(reader, batch_size)[1:], batch_size)
    if request.dtype == "auto" and reader.mixed_precision:
        try:
            wide_fits = widest_dense_bytes(reader) <= planned(reader, batch_size)[0]
        except MoecompressError:
            wide_fits = False
        if not wide_fits:  # float32 copies of the weights outside the routed experts do not fit: the stored dtype
            log.info("the layers' weights outside the routed experts do not fit the budget in float32; computing "
                     "in %s", str(reader.expert_dtype).replace("torch.", ""))
            reader = CheckpointReader(model_path, dtype=reader.expert_dtype, info=info)
    needed = widest_dense_bytes(reader)
    rows = batch_size
    while True:  # halve the batch until the widest layer and a batch's activations fit
        try:
            max_layer_bytes, spill = planned(reader, rows)
        except MoecompressError:
            if rows == 1:
                raise
            rows = max(1, rows // 2)
            continue
        if needed <= max_layer_bytes:
            break
        if rows == 1:
            budget = host_budget(request.max_memory, local_ranks) or 0
            given = "--max-memory" if request.max_memory is not None else "the memory available"
            raise MoecompressError(
                f"{given} ({format_gib(budget)}) cannot hold the widest decoder layer's weights outside the routed "
                f"experts ({format_gib(needed)}) beside one window's activations; raise --max-memory or lower "
                "--seq-len")
        rows = max(1, rows // 2)
    if rows != batch_size:
        log.warning("lowering --batch-size from %d to %d: the widest decoder layer (%s outside its routed experts) "
                    "and a batch's activations must fit the memory budget", batch_size, rows, format_gib(needed))
    return LayerPassPlan(reader, max_layer_bytes, spill, rows)


STATISTICS_RESULT = "statistics"  # the name of the calibrated statistics among a run's kept results


def resumed_statistics(checkpoints: RunCheckpoints) -> RoutingStats | None:
    """The statistics a resumed run calibrated before it was interrupted (None: none were kept)."""
    saved = checkpoints.result(STATISTICS_RESULT)
    if saved is None:
        return None
    log.warning("reusing the statistics calibrated before the interruption (in %s)", saved)
    return RoutingStats.load(saved)


def keep_statistics(checkpoints: RunCheckpoints, stats: RoutingStats) -> None:
    """Keep freshly calibrated statistics among the run's checkpoints, for `resumed_statistics`."""
    checkpoints.save_result(STATISTICS_RESULT, stats.save)


def calibrate(model_path: str | Path, request: CalibrationRequest | None = None, progress: bool = True,
              data_parallel: bool = True, checkpoints: RunCheckpoints | None = None,
              choose_experts: ExpertChoice | None = None, pass_name: str = "calibrating") -> RoutingStats:
    """Load a local checkpoint and its tokenizer, build the calibration set and collect statistics.

    request (`CalibrationRequest`; default: its defaults): request.sources: calibration domains
    (`DomainSource`); None uses the shipped calibration sets. request.samples: windows of
    seq_len tokens per domain, chosen with `seed`. request.dtype: compute dtype (`auto`: the
    checkpoint's); request.device: cpu, cuda, cuda:N or auto. Layer by layer (the default
    mode) the model is read from the checkpoint one decoder layer at a time (gradient
    statistics too, through the layer-streamed backward pass); whole-model mode loads it whole.
    request.max_memory: host bytes (or text such as "24GiB") the pass may plan with, default 85% of
    what is still available; see `layer_budget`.
    data_parallel: when launched by torchrun (``WORLD_SIZE`` > 1) join the process group
    (`distributed.initialise`) and split the batches across the ranks (`collect_statistics`);
    every rank must then call this with the same arguments, and every rank returns the same
    statistics. False, or a single process: everything runs here, nothing is communicated.
    checkpoints: the run's checkpoints (`moecompress.engine.resume`): the layer pass saves its
    progress there after every layer and, when the run resumes, continues from it.
    choose_experts: calibrate sequentially (`collect_statistics`); the header's data records
    ``"sequential": true``. Needs the layer-by-layer mode.
    pass_name: the layer pass's name among the run's checkpoints (a run of two passes names
    them apart).
    """
    request = request or CalibrationRequest()
    checkpoints = checkpoints or RunCheckpoints.disabled()
    if data_parallel:
        distributed.initialise(request.device)
    parallel = data_parallel and distributed.active()
    with distributed.phase("loading the checkpoint and calibration data") if parallel else contextlib.nullcontext():
        setup = _prepare(model_path, request, parallel)
    calib = setup.calib
    checkpoints.require("calibration data", calib.digest)
    observer = collect_statistics(
        setup.model, setup.adapter, calib.input_ids, calib.domain_ids, calib.domains,
        ObservedPass(statistics=setup.statistics, batch_size=setup.batch_size, mode=setup.mode, reader=setup.reader,
                     device=setup.device, max_layer_bytes=setup.max_layer_bytes, data_parallel=parallel,
                     checkpoints=checkpoints.layer_pass(pass_name),
                     spill_to=(checkpoints.folder or Path(tempfile.gettempdir())) if setup.spill else None,
                     choose_experts=choose_experts),
        progress)
    seed = request.seed
    data = {"sources": calib.sources, "seq_len": calib.seq_len, "num_samples_per_domain": request.samples,
            "seed": seed, "batch_size": setup.batch_size, "dtype": request.dtype,
            "compute_dtype": str(setup.reader.dtype if setup.reader is not None else next(setup.model.parameters()).dtype)
            .replace("torch.", ""), "device": str(setup.device),
            "world_size": distributed.world_size() if parallel else 1}
    if choose_experts is not None:
        data["sequential"] = True
    return build_stats(setup.model, observer, model_path, calib.digest, data, setup.mode, seed)


def calibrate_to_folder(model_path: str | Path, output: str | Path, request: CalibrationRequest | None = None,
                        force: bool = False, resume: bool = False, progress: bool = True) -> RoutingStats:
    """`calibrate`, then save the statistics into the folder `output` (atomically; rank 0 under torchrun).

    The layer pass keeps checkpoints beside `output` (`moecompress.engine.resume`); `resume`
    continues a killed run of the same call from its last finished layer.
    """
    from moecompress.io.output import atomic_output_dir

    request = request or CalibrationRequest()
    with RunCheckpoints(output, "calibrate", resume=resume) as checkpoints:
        checkpoints.require("options", request.fingerprint())
        checkpoints.require("input checkpoint", source_fingerprint(model_path))
        stats = calibrate(model_path, request, progress=progress, checkpoints=checkpoints)

        def write() -> None:
            with atomic_output_dir(output, force=force) as tmp:
                stats.save(tmp)

        distributed.writer_only(write, "writing the statistics")  # under torchrun: rank 0 writes, the others wait
    return stats


class _Setup(NamedTuple):
    model: nn.Module
    adapter: MoEAdapter
    calib: Any  # CalibrationSet
    statistics: list[str]
    mode: str
    device: torch.device
    reader: CheckpointReader | None
    max_layer_bytes: int | None
    spill: bool = False  # the cached hidden states go to memory-mapped files
    batch_size: int = 8  # windows per batch: the request's, or fewer where its activations do not fit the budget


def _prepare(model_path: str | Path, request: CalibrationRequest, parallel: bool) -> _Setup:
    """`calibrate`'s set-up on this process: the calibration set and the model (or its layer reader).

    Data parallel, a rank plans its layer budget with the activations of its own share of the
    batches, and without --max-memory with its share of the node's memory (the default budget
    divided by ``LOCAL_WORLD_SIZE``, the ranks on this node); --max-memory is per process.
    """
    from moecompress.engine.layers import resolve_device
    from moecompress.calibration.data import build_calibration_set, default_calibration_sources
    from moecompress.models.load import load_model, load_tokenizer

    dtype, mode, batch_size = request.dtype, request.mode, request.batch_size
    statistics = validate_statistics(request.statistics)
    torch.manual_seed(request.seed)
    tokenizer = load_tokenizer(model_path)
    sources = list(request.sources) if request.sources else default_calibration_sources()
    calib = build_calibration_set(tokenizer, sources, num_samples=request.samples, seq_len=request.seq_len,
                                  seed=request.seed)
    from moecompress.models.load import inspect_checkpoint

    compute_device = resolve_device(request.device)
    info = inspect_checkpoint(model_path)
    if mode == "layerwise" and not info.adapter.layerwise_supported:
        log.warning("%s layers pass state between layers; calibrating with whole-model passes instead",
                    info.config.model_type)
        mode = "whole-model"
    reader = None
    max_layer_bytes = None
    spill = False
    if mode == "layerwise" and info.adapter.streaming_supported:
        backward = any(name in GRADIENT_STATISTICS for name in statistics)  # keeps every layer's input
        plan = plan_layer_pass(model_path, info, calib, request, parallel, backward)
        reader, max_layer_bytes, spill, batch_size = plan.reader, plan.max_layer_bytes, plan.spill, plan.batch_size
        model, adapter = reader.model, reader.adapter
    else:
        model, adapter = load_model(model_path, dtype=dtype)
        model.to(compute_device)
    return _Setup(model, adapter, calib, statistics, mode, compute_device, reader, max_layer_bytes, spill,
                  batch_size)
