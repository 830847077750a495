"""Costs of moecompress's own machinery, as harness suites (so they land in RESULTS.md).

* ``observer-overhead``: time of the observed calibration pass over the time of a plain
  forward on the same tokens (target from the foundation issue: at most 1.3), on every
  fixture (its validation windows) and on a larger random Qwen3-MoE. Whole-model mode and
  layer-at-a-time mode (whose baseline is a plain layer-at-a-time pass without LM head).
* ``calibration-memory``: peak RSS of `moecompress calibrate` in a fresh process on a
  synthetic bf16 checkpoint of a few hundred MB, against the checkpoint's size on disk.
* ``lp-solve-time``: wall-clock time of the bit-allocation programs (global MC-MoE/GEMQ,
  per-layer, joint drop/2/3/4) at 48 layers x 128 experts on synthetic costs, HiGHS and CBC.

The measuring code lives next to its standalone scripts (`benchmarks/observer/overhead.py`,
`benchmarks/memory/calibrate_peak.py`, `benchmarks/quant/lp_solve_time.py`); these suites
run it with fixed settings and render the tables.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.harness.context import Fixture
from benchmarks.harness.report import renderer
from benchmarks.harness.suites import suite

OVERHEAD_TARGET = 1.3
MEMORY_SHAPE = {"layers": 8, "hidden": 1024, "experts": 32, "width": 512, "samples": 2}
LP_SHAPE = {"layers": 48, "experts": 128, "time_limit": 60.0}


def fixture_batches(fixture: Fixture, batches: int, batch_size: int) -> list[torch.Tensor]:
    """`batches` tensors (batch_size, seq_len) of the fixture's validation windows."""
    from moecompress.calibration.data import build_calibration_set

    sources = fixture.calibration_sources()
    per_domain = -(-batches * batch_size // len(sources))
    calib = build_calibration_set(fixture.tokenizer, sources, num_samples=per_domain,
                                  seq_len=fixture.protocol.seq_len, seed=fixture.protocol.calib_seed)
    order = torch.randperm(calib.input_ids.shape[0], generator=torch.Generator().manual_seed(0))
    windows = calib.input_ids[order][: batches * batch_size]  # (batches * B, S), domains mixed
    return list(windows.split(batch_size))


@suite("observer-overhead", "Observer overhead: observed calibration pass vs plain forward")
def observer_overhead(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Median times of plain and observed passes per fixture and on a random 32-expert model."""
    from benchmarks.observer.overhead import measure, synthetic_model

    repeats = int(options.get("overhead_repeats", 5))
    batches, batch_size = int(options.get("overhead_batches", 4)), int(options.get("overhead_batch_size", 4))
    rows = []
    for fixture in fixtures:
        data = fixture_batches(fixture, batches, batch_size)
        rows.append({"model": fixture.name, "source": "validation windows",
                     **measure(fixture.model, data, repeats)})
    if options.get("overhead_synthetic", True):
        model = synthetic_model()
        gen = torch.Generator().manual_seed(0)
        seq_len = fixtures[0].protocol.seq_len if fixtures else 256
        data = [torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=gen)
                for _ in range(batches)]
        rows.append({"model": "random qwen3_moe (4 layers, hidden 256, 32 experts, top-4)",
                     "source": "random tokens", **measure(model, data, repeats)})
    return {"rows": rows, "repeats": repeats, "target": OVERHEAD_TARGET}


@renderer("observer-overhead")
def render_overhead(data: dict[str, Any]) -> list[str]:
    """Table of plain/observed times and their ratios, with the target check."""
    lines = [f"Median of {data['repeats']} repeats after a warm-up; every default statistic collected "
             "(counts, soft counts, REAP, EASY-EP, TCESS, activation norms).", "",
             "| model | tokens | plain forward | observed | ratio | plain layer-at-a-time | observed | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in data["rows"]:
        lines.append(f"| {row['model']} | {row['tokens']:,} | {row['plain_forward_s']:.3f} s | "
                     f"{row['observed_forward_s']:.3f} s | **{row['overhead_whole_model']:.2f}x** | "
                     f"{row['plain_layerwise_s']:.3f} s | {row['observed_layerwise_s']:.3f} s | "
                     f"{row['overhead_layerwise']:.2f}x |")
    met = [row["model"] for row in data["rows"] if row["overhead_whole_model"] <= data["target"]]
    lines += ["", f"Check: whole-model overhead at most {data['target']}x for {len(met)} of {len(data['rows'])} "
              f"models. The layer-at-a-time baseline has no LM head, so the same bookkeeping weighs more there.", ""]
    return lines


@suite("calibration-memory", "Calibration memory: peak RSS of `moecompress calibrate` vs checkpoint size")
def calibration_memory(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of a layer-at-a-time calibrate run in a fresh process on a synthetic checkpoint."""
    from benchmarks.memory.calibrate_peak import measure

    shape = {**MEMORY_SHAPE, **options.get("memory_shape", {})}
    return {"shape": shape, **measure(shape["layers"], shape["hidden"], shape["experts"], shape["width"],
                                      shape["samples"])}


@renderer("calibration-memory")
def render_memory(data: dict[str, Any]) -> list[str]:
    """One-row table of checkpoint size, peak and baseline RSS."""
    shape = data["shape"]
    mb = 1024 ** 2
    return [
        f"Synthetic bf16 Qwen3-MoE: {shape['layers']} layers, hidden {shape['hidden']}, {shape['experts']} experts "
        f"of width {shape['width']}; `moecompress calibrate --samples {shape['samples']} --seq-len 128` "
        "(layer-at-a-time, the default) in a fresh process; baseline = a fresh interpreter that imported torch, "
        "transformers, the Qwen3-MoE model class and moecompress's calibration code.", "",
        "| checkpoint on disk | peak RSS | baseline RSS | (peak - baseline) / checkpoint | time |",
        "|---:|---:|---:|---:|---:|",
        f"| {data['checkpoint_bytes'] / mb:,.0f} MB | {data['peak_rss_bytes'] / mb:,.0f} MB | "
        f"{data['baseline_rss_bytes'] / mb:,.0f} MB | **{data['peak_above_baseline_over_checkpoint']:.2f}x** | "
        f"{data['calibrate_seconds']:.0f} s |", "",
        *_memory_parts(data)]


def _memory_parts(data: dict[str, Any]) -> list[str]:
    """The anonymous / file-backed split of the peak (results written before it was measured have none)."""
    if "peak_anon_bytes" not in data:
        return ["Known gap: the whole checkpoint is materialised while transformers converts it at load time, so "
                "the peak is about the checkpoint's size; the calibration pass itself then holds one layer's "
                "activations at a time.", ""]
    mb = 1024 ** 2
    return [
        "The same run split into anonymous memory (heap and tensors: what the run really needs) and file-backed "
        "pages (the memory-mapped safetensors shards and shared libraries: clean pages the kernel drops under "
        "memory pressure and re-reads from disk). Peaks are sampled every 5 ms, so each part's peak is taken on "
        "its own and the two need not add up to the peak RSS.", "",
        "| part | peak | baseline | (peak - baseline) / checkpoint |",
        "|---|---:|---:|---:|",
        f"| anonymous | {data['peak_anon_bytes'] / mb:,.0f} MB | {data['baseline_anon_bytes'] / mb:,.0f} MB | "
        f"**{data['anon_above_baseline_over_checkpoint']:.2f}x** |",
        f"| file-backed | {data['peak_file_bytes'] / mb:,.0f} MB | {data['baseline_file_bytes'] / mb:,.0f} MB | "
        f"{data['file_above_baseline_over_checkpoint']:.2f}x |", "",
        _against_one_layer(data) + _load_share(data), ""]


def _against_one_layer(data: dict[str, Any]) -> str:
    """The anonymous peak set against one decoder layer's share of the checkpoint."""
    anon, layers = data["anon_above_baseline_over_checkpoint"], data["shape"]["layers"]
    if anon > 1 / layers:
        return (f"Known gap: {anon:.2f}x of the checkpoint in anonymous memory is more than one of its {layers} "
                f"decoder layers ({1 / layers:.2f}x).")
    return f"{anon:.2f}x of the checkpoint in anonymous memory is within one of its {layers} decoder layers ({1 / layers:.2f}x)."


def _load_share(data: dict[str, Any]) -> str:
    """The streaming load's own anonymous peak, when this run measured it."""
    if "load_anon_above_baseline_over_checkpoint" not in data:
        return ""
    load = data["load_anon_above_baseline_over_checkpoint"]
    where = ("the peak is reached during the layer pass" if load < data["anon_above_baseline_over_checkpoint"]
             else "the peak is the load's")
    return (" A fresh process that only opens the checkpoint for the layer engine (the meta-device skeleton and "
            f"the disk-to-module key map) peaks at {load:.2f}x in anonymous memory above the same baseline, so "
            f"{where}.")


@suite("lp-solve-time", "Bit-allocation programs: solve time at 48 layers x 128 experts")
def lp_solve_time(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Time every allocation program with HiGHS and CBC on synthetic MC-MoE-shaped costs."""
    from benchmarks.quant.lp_solve_time import run

    shape = {**LP_SHAPE, **options.get("lp_shape", {})}
    return {"shape": shape, "rows": run(shape["layers"], shape["experts"], shape["time_limit"])}


@renderer("lp-solve-time")
def render_lp(data: dict[str, Any]) -> list[str]:
    """Table of program size, solver status and time."""
    shape = data["shape"]
    lines = [f"{shape['layers']} layers x {shape['experts']} experts, synthetic costs (see "
             "`benchmarks/quant/lp_solve_time.py`); wall clock including program construction; "
             f"{shape['time_limit']:.0f} s limit.", "",
             "| program | solver | binaries | status | gap | time | average bits |",
             "|---|---|---:|---|---:|---:|---:|"]
    for row in data["rows"]:
        gap = "-" if row["gap"] is None else f"{row['gap']:.1e}"
        lines.append(f"| {row['program']} | {row['solver']} | {row['variables']:,} | {row['status']} | {gap} | "
                     f"{row['seconds']:.2f} s | {row['average_bits']:.3f} |")
    slowest = max((row["seconds"] for row in data["rows"]), default=0.0)
    optimal = sum(row["status"] == "optimal" for row in data["rows"])
    lines += ["", f"Check: {optimal} of {len(data['rows'])} solves optimal; slowest {slowest:.1f} s.", ""]
    return lines
