"""Run one recipe step: the same library call, with the same arguments, as its CLI command.

Each function mirrors the body of `moecompress/cli/<op>_cmd.py` (a test compares the
checkpoints bit for bit), with the options a recipe does not have supplied by the runner:
the input checkpoint, the step's folder as `--output` (replaced if present, as `--force`
does), and `--stats` from an earlier calibrate step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from moecompress.recipe.steps import (
    CalibrateStep,
    CompressStep,
    CondenseStep,
    EvalStep,
    ExportGGUFStep,
    PruneStep,
    QuantizeStep,
    Step,
    WriteStep,
)


def _sources(step: Step) -> list[Any] | None:
    """`--data` specs -> domain sources, or None for the shipped sets (as every command does)."""
    from moecompress.calibration.data import parse_data_specs

    data = getattr(step, "data", None)
    return parse_data_specs(data, field=step.field) if data else None  # type: ignore[attr-defined]


def _stats(stats_dir: Path | None, model: Path) -> Any:
    """`RoutingStats.load(--stats, expect_config=...)`, or None."""
    from moecompress.calibration.stats import RoutingStats
    from moecompress.models.load import load_config

    return RoutingStats.load(stats_dir, expect_config=load_config(model)) if stats_dir is not None else None


def run_calibrate(step: CalibrateStep, model: Path, output: Path, progress: bool = True, resume: bool = False) -> Any:
    """`moecompress calibrate`: returns the `RoutingStats` saved in `output`."""
    from moecompress.calibration.calibrate import calibrate_to_folder
    from moecompress.calibration.request import CalibrationRequest
    from moecompress.io.output import check_output_dir
    from moecompress.models.load import inspect_checkpoint

    check_output_dir(output, True, inputs=(model,))
    inspect_checkpoint(model)
    mode = "whole-model" if step.whole_model else "layerwise"
    return calibrate_to_folder(model, output,
                               CalibrationRequest(sources=_sources(step), samples=step.samples, seq_len=step.seq_len,
                                                  seed=step.seed, batch_size=step.batch_size, dtype=step.dtype,
                                                  statistics=step.statistics(), mode=mode, device=step.device,
                                                  max_memory=step.max_memory), force=True, resume=resume,
                               progress=progress)


def run_prune(step: PruneStep, model: Path, output: Path, stats_dir: Path | None, progress: bool = True,
              resume: bool = False) -> Any:
    """`moecompress prune`: returns the `PruneResult` (under torchrun `prune_checkpoint` writes on rank 0 only)."""
    from moecompress.prune.request import PruneRequest
    from moecompress.prune.run import prune_checkpoint

    request = PruneRequest(method=step.method, ratio=step.ratio, keep=step.keep, params=dict(step.param or {}),
                           domain=step.domain, protect_super_experts=not step.no_protect_super_experts,
                           allocation=step.allocation, new_top_k=step.top_k, dynamic_skip=step.dynamic_skip,
                           patterns=step.patterns, scoring=step.scoring, merge=step.merge, sources=_sources(step),
                           samples=step.samples, seq_len=step.seq_len, seed=step.seed, batch_size=step.batch_size,
                           dtype=step.dtype, device=step.device, max_memory=step.max_memory)
    return prune_checkpoint(model, output, request, stats=_stats(stats_dir, model), force=True, progress=progress,
                            resume=resume)


def run_condense(step: CondenseStep, model: Path, output: Path, progress: bool = True) -> Any:
    """`moecompress condense`: returns the `CondenseResult`."""
    from moecompress.condense.run import CondenseRequest, condense_checkpoint

    request = CondenseRequest(layers=step.layer_list(), experts=step.experts, num_layers=step.num_layers,
                              criterion=step.criterion.lower(), layout=step.layout.lower(), sources=_sources(step),
                              samples=step.samples, seq_len=step.seq_len, seed=step.seed,
                              batch_size=step.batch_size, dtype=step.dtype, timing=not step.no_timing)
    return condense_checkpoint(model, output, request, force=True, progress=progress)


def _request(step: QuantizeStep | CompressStep) -> Any:
    from moecompress.quant.run import parse_request

    values = step.request_values(step.samples, step.seq_len, step.seed)  # type: ignore[arg-type]
    return parse_request(**values, expert_memory=step.expert_memory_bytes(()))


def run_quantize(step: QuantizeStep, model: Path, output: Path, progress: bool = True, resume: bool = False) -> Any:
    """`moecompress quantize`: returns the `QuantizeResult`."""
    from moecompress.quant.run import quantize_checkpoint

    request = _request(step)
    return quantize_checkpoint(model, output, request, sources=_sources(step), force=True, progress=progress,
                               resume=resume)


def run_compress(step: CompressStep, model: Path, output: Path, stats_dir: Path | None, progress: bool = True,
                 resume: bool = False) -> Any:
    """`moecompress compress`: returns the `QuantizeResult`."""
    from moecompress.compress.joint import JointPruning, compress_checkpoint

    request = _request(step)
    loaded_stats = _stats(stats_dir, model)
    pruning = JointPruning(method=step.prune_method, params=dict(step.param or {}),
                           protect_super_experts=not step.no_protect_super_experts, stats=loaded_stats)
    result, _ = compress_checkpoint(model, output, request, pruning, sources=_sources(step), force=True,
                                    progress=progress, resume=resume)
    return result


def run_eval(step: EvalStep, model: Path, output: Path, progress: bool = True) -> Any:
    """`moecompress eval --json-out OUTPUT/eval.json`: returns the `EvalReport`."""
    from moecompress.calibration.data import default_calibration_sources
    from moecompress.engine import distributed
    from moecompress.evaluate import evaluate_perplexity
    from moecompress.io.output import atomic_output_dir
    from moecompress.models.load import load_tokenizer

    sources = _sources(step) or default_calibration_sources()
    tokenizer = load_tokenizer(model)
    from moecompress.loader import open_for_evaluation

    loaded, reader = open_for_evaluation(model, step.dtype, step.streaming)
    report = evaluate_perplexity(loaded, tokenizer, sources, seq_len=step.seq_len, max_windows=step.windows,  # type: ignore[arg-type]
                                 batch_size=step.batch_size, progress=progress, reader=reader)
    report.model_path = str(model)
    report.extra["dtype"] = step.dtype
    report.extra["streaming"] = step.streaming
    report.extra["data"] = [{"name": s.name, "path": str(s.path), "field": s.field} for s in sources]
    report.extra["world_size"] = distributed.world_size()

    def write() -> None:
        with atomic_output_dir(output, force=True) as tmp:
            (tmp / "eval.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")

    distributed.writer_only(write, "writing eval.json")  # under torchrun every rank scored its share; rank 0 writes
    return report


GGUF_FILE = "model.gguf"  # the file an export-gguf step writes in its folder


def run_export_gguf(step: ExportGGUFStep, model: Path, output: Path, progress: bool = True) -> Any:
    """`moecompress export gguf -o OUTPUT/model.gguf`: returns the `GGUFExportResult` (its path in `output`)."""
    from moecompress.export.gguf import export_gguf
    from moecompress.export.gguf_budget import parse_budget
    from moecompress.export.gguf_mix import MixOptions
    from moecompress.io.output import atomic_output_dir

    budget = parse_budget(step.bits, step.size)
    mix = None
    if budget is not None:
        mix = MixOptions(budget=budget, sources=_sources(step), samples=step.samples, seq_len=step.seq_len,  # type: ignore[arg-type]
                         seed=step.seed, batch_size=step.batch_size, sensitivity=step.sensitivity,  # type: ignore[arg-type]
                         device=step.device)
    with atomic_output_dir(output, force=True) as tmp:
        result = export_gguf(model, tmp / GGUF_FILE, output_type=step.type, force=True, progress=progress, mix=mix)
    result.path = output / GGUF_FILE
    return result


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a file (no copy of a large checkpoint), or copy it across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_write(step: WriteStep, model: Path, replace: bool) -> Path:
    """Put the checkpoint `model` at the step's output, file for file; returns the output."""
    from moecompress.io.output import atomic_output_dir

    assert step.output is not None
    output = Path(step.output)
    with atomic_output_dir(output, force=replace) as tmp:
        shutil.copytree(model, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
    return output
