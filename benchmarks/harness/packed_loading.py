"""Suite ``packed-loading``: a 2.5-bit GPTQ output opened by `moecompress.load`, dense against packed.

Per fixture, the fixture is quantised to 2.5 average expert bits with `quantize`'s default
method (GPTQ format) and the folder is opened two ways:

* ``dequantize="load"``: every weight dequantised to float32 at load (the dense path);
* ``dequantize="use"``: the packed tensors held as they are on disk, a layer's quantised linears
  dequantised while it runs, routed experts only for the experts tokens are routed to, a group at
  a time (`moecompress.quant.packed_experts`).

Memory is measured in a fresh spawned process per mode: the peak of live CPU tensor bytes
(`peak_memory.tensor_peak`, torch's allocation record) over loading the folder and running one
test window of `seq_len` tokens (batch 1), and the peak of anonymous RSS above the process's
size before loading (`RssSampler`). Speed in the same child, without the profiler: the time to
load, a forward pass over every test window of the protocol (tokens per second), and greedy
decoding of `decode_tokens` tokens after a 32-token prompt with the KV cache (tokens per
second). Quality in this process: KL divergence and top-1 agreement to the unquantised model
on the test windows for both modes (`quant_agreement.score`), and the largest absolute logit
difference between the modes on the first test window.

At real layer shapes (options["scale_layers"] > 0): the scale suite's random-weight
Qwen3-30B-A3B checkpoint with that many decoder layers (`benchmarks.scale.checkpoints`) is
quantised by `moecompress quantize` with the same bits and method, and `moecompress eval` on the
output (one 256-token window per shipped domain, batch 1) runs in its own memory cgroup, dense
and with `--streaming` (packed): the group's peak anonymous memory (sampled) is what running
the model needs in RAM; its wall time is the eval's whole run (load included).
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.harness.context import Fixture
from benchmarks.harness.quant_agreement import evaluation_windows, score
from benchmarks.harness.report import renderer
from benchmarks.harness.suites import suite

MODES = ("load", "use")
DEFAULTS: dict[str, Any] = {
    "bits": 2.5,
    "method": "gemq",  # `quantize`'s default method
    "group_size": 128,
    "group_aware": True,
    "decode_tokens": 32,
    "prompt_tokens": 32,
    "scale_spec": "qwen3_30b_a3b",
    "scale_layers": 2,  # 0: skip the real-shape part
    "scale_timeout": 3600,
}
MEMORY_RATIO = 0.5  # the packed path's peak live tensor bytes at most this fraction of the dense path's
LOGIT_TOLERANCE = 1e-4  # largest absolute logit difference between the two paths


def _measure_mode(folder: str, mode: str, windows: torch.Tensor, prompt_tokens: int, decode_tokens: int,
                  threads: int) -> dict[str, Any]:
    """In a fresh process: memory and speed of `moecompress.load(folder, dequantize=mode)` (see module docstring)."""
    import moecompress
    from benchmarks.harness.peak_memory import RssSampler, current_rss, tensor_peak

    torch.set_num_threads(threads)  # the harness's thread count (a spawned child starts with torch's default)
    torch.manual_seed(0)
    baseline = current_rss()
    sampler = RssSampler().start()
    one = windows[:1]  # (1, S)

    def load_and_run_one() -> float:
        model = moecompress.load(folder, dequantize=mode)
        with torch.no_grad():
            model(input_ids=one, use_cache=False)
        return 0.0

    _, live_peak = tensor_peak(load_and_run_one)
    anon = sampler.stop()["anon"]
    start = time.perf_counter()
    model = moecompress.load(folder, dequantize=mode)
    load_seconds = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        for row in windows:
            model(input_ids=row[None], use_cache=False)
        forward_seconds = time.perf_counter() - start
        prompt = windows[:1, :prompt_tokens]  # (1, P)
        start = time.perf_counter()
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False)
        decode_seconds = time.perf_counter() - start
    new_tokens = generated.shape[1] - prompt.shape[1]
    return {"mode": mode, "live_peak_bytes": live_peak, "anon_peak_above_start": anon - baseline,
            "load_seconds": load_seconds, "forward_tokens_per_second": windows.numel() / forward_seconds,
            "decode_tokens_per_second": new_tokens / decode_seconds, "decoded": int(new_tokens)}


def _in_child(*args: Any) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_measure_mode, *args).result()


def fixture_row(fixture: Fixture, settings: dict[str, Any]) -> dict[str, Any]:
    """Quantise one fixture at the suite's bits, then measure both loading paths."""
    import moecompress
    from benchmarks.harness.quantisation import FixtureRun
    from moecompress.io.checkpoint import folder_bytes
    from moecompress.quant.run import quantize_checkpoint

    with tempfile.TemporaryDirectory(prefix="moecompress-packed-bench-") as tmp:
        run = FixtureRun(fixture, settings, Path(tmp))
        out = run.output(f"{settings['method']}-{settings['bits']}")
        quantize_checkpoint(fixture.folder, out, run.request(method=settings["method"], bits=settings["bits"]),
                            sources=fixture.calibration_sources(), progress=False)
        windows = torch.cat(list(evaluation_windows(fixture).values()))  # (N, S) every domain's test windows
        modes: dict[str, Any] = {}
        first_logits = {}
        for mode in MODES:
            model = moecompress.load(out, dequantize=mode)
            quality = score(model, run.reference)
            with torch.no_grad():
                first_logits[mode] = model(input_ids=windows[:1], use_cache=False).logits.float()
            del model
            measured = _in_child(str(out), mode, windows, settings["prompt_tokens"], settings["decode_tokens"],
                                 torch.get_num_threads())
            modes[mode] = {**measured, "kl": quality["kl"], "top1": quality["top1"],
                           "mean_perplexity": quality["mean_perplexity"]}
        return {"fixture": fixture.name, "bytes": folder_bytes(out), "windows": int(windows.shape[0]),
                "seq_len": int(windows.shape[1]), "modes": modes,
                "max_logit_difference": float((first_logits["load"] - first_logits["use"]).abs().max())}


def _moecompress(*args: str) -> list[str]:
    return [sys.executable, "-m", "moecompress", *args]


def scale_row(settings: dict[str, Any]) -> dict[str, Any]:
    """The real-shape part (see the module docstring): quantise, then eval dense and packed in memory cgroups."""
    from benchmarks.scale.cgroup import run_capped, unavailable_reason
    from benchmarks.scale.checkpoints import cached_checkpoint
    from moecompress.io.checkpoint import folder_bytes

    reason = unavailable_reason()
    if reason is not None:
        return {"error": f"memory cgroups unavailable: {reason}"}
    checkpoint, record = cached_checkpoint(settings["scale_spec"], settings["scale_layers"])
    row: dict[str, Any] = {"spec": settings["scale_spec"], "layers": settings["scale_layers"],
                           "checkpoint_bytes": folder_bytes(checkpoint), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="moecompress-packed-scale-") as tmp:
        out = Path(tmp) / "quantized"
        quantized = run_capped(_moecompress("quantize", str(checkpoint), "--bits", str(settings["bits"]), "--method",
                                            settings["method"], "--samples", "8", "-o", str(out)),
                               None, settings["scale_timeout"])
        row["quantize_seconds"] = quantized.seconds
        if not quantized.ok:
            row["error"] = f"quantize failed ({quantized.outcome}): {(quantized.stderr_tail or ['?'])[-1]}"
            return row
        row["gptq_bytes"] = folder_bytes(out)
        for mode in MODES:
            report = Path(tmp) / f"eval-{mode}.json"
            argv = _moecompress("eval", str(out), "--windows", "1", "--seq-len", "256", "--batch-size", "1",
                                "--json-out", str(report), *(["--streaming"] if mode == "use" else []))
            run = run_capped(argv, None, settings["scale_timeout"])
            entry: dict[str, Any] = {"ok": run.ok, "seconds": run.seconds, "anon_peak": run.peak_rss,
                                     "max_usage": run.max_usage}
            if run.ok:
                entry["mean_perplexity"] = json.loads(report.read_text())["mean_perplexity"]
            else:
                entry["error"] = f"{run.outcome}: {(run.stderr_tail or ['?'])[-1]}"
            row["modes"][mode] = entry
    return row


@suite("packed-loading", "Opening a 2.5-bit GPTQ output: dense at load against packed until use")
def packed_loading(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """One row per fixture, and the real-shape row; options override `DEFAULTS`."""
    settings = {**DEFAULTS, **options}
    rows = [fixture_row(fixture, settings) for fixture in tqdm(fixtures, desc="packed-loading", unit="fixture")]
    scale = scale_row(settings) if settings["scale_layers"] > 0 else None
    return {"rows": rows, "scale": scale, "settings": settings}


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def checks(row: dict[str, Any]) -> list[str]:
    """The suite's targets for one fixture, each marked met or missed."""
    dense, packed = row["modes"]["load"], row["modes"]["use"]
    ratio = packed["live_peak_bytes"] / dense["live_peak_bytes"]
    same = row["max_logit_difference"] <= LOGIT_TOLERANCE
    return [f"- {row['fixture']}: packed peak {ratio:.2f}x the dense path's live tensor bytes (target ≤ "
            f"{MEMORY_RATIO}x): {'met' if ratio <= MEMORY_RATIO else 'missed'}; logits differ by at most "
            f"{row['max_logit_difference']:.1e} (tolerance {LOGIT_TOLERANCE:.0e}): {'met' if same else 'missed'}"]


@renderer("packed-loading")
def render_packed_loading(data: dict[str, Any]) -> list[str]:
    """One table (fixture x mode: memory, speed, quality) and the checks."""
    settings = data["settings"]
    lines = [
        f"GPTQ checkpoints of each fixture at {settings['bits']} average expert bits (`quantize --method "
        f"{settings['method']}`, group size {settings['group_size']}) opened with `moecompress.load(folder, "
        "dequantize=MODE)`: `load` dequantises every weight to float32 at load; `use` keeps the packed tensors and "
        "dequantises a layer's linears while it runs and only the routed experts, a group at a time. Each mode is "
        "measured in a fresh process: live tensor peak = highest live CPU tensor bytes (torch's allocation record) "
        "over loading and one forward pass of one test window (batch 1); anon = peak anonymous RSS above the "
        "process before loading; forward = every test window one at a time, no KV cache; decode = greedy decoding "
        f"of {settings['decode_tokens']} tokens after a {settings['prompt_tokens']}-token prompt with the KV cache. "
        "KL and top-1 against the unquantised model on the test windows; logit difference: the largest absolute "
        "difference between the two modes' logits on the first test window.",
        "",
        "| fixture | GPTQ MiB | mode | live tensor peak MiB | anon peak MiB | load s | forward tok/s | decode tok/s "
        "| KL | top-1 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        for mode in MODES:
            m = row["modes"][mode]
            lines.append(f"| {row['fixture']} | {_mib(row['bytes'])} | {mode} | {_mib(m['live_peak_bytes'])} | "
                         f"{_mib(m['anon_peak_above_start'])} | {m['load_seconds']:.2f} | "
                         f"{m['forward_tokens_per_second']:.0f} | {m['decode_tokens_per_second']:.1f} | "
                         f"{m['kl']:.4f} | {m['top1']:.4f} |")
    lines += ["", "Checks:", ""]
    for row in data["rows"]:
        lines += checks(row)
    lines += render_scale(data.get("scale"), settings)
    return lines


def render_scale(row: dict[str, Any] | None, settings: dict[str, Any]) -> list[str]:
    """The real-shape table: eval of the quantised checkpoint, dense against packed."""
    if row is None:
        return []
    lines = ["", f"At real layer shapes: {row.get('spec', settings['scale_spec'])}, "
             f"{row.get('layers', settings['scale_layers'])} decoder layers, random weights (the scale suite's "
             f"checkpoint), `moecompress quantize --bits {settings['bits']} --method {settings['method']} --samples 8`, "
             "then `moecompress eval OUT --windows 1 --seq-len 256 --batch-size 1` (one window per shipped domain) "
             "in its own memory cgroup, without and with `--streaming` (packed). Anon peak: the group's peak "
             "anonymous memory, sampled every 50 ms (what the run needs in RAM; the memory-mapped files are page "
             "cache); time: the whole eval, load included.", ""]
    if "error" in row:
        return lines + [f"Not measured: {row['error']}"]
    gib = 2**30
    lines += [f"Checkpoint {row['checkpoint_bytes'] / gib:.2f} GiB (bf16), GPTQ output {row['gptq_bytes'] / gib:.2f} "
              f"GiB (quantised in {row['quantize_seconds'] / 60:.1f} min).", "",
              "| eval | anon peak GiB | x GPTQ size | wall s | mean perplexity |", "|---|---:|---:|---:|---:|"]
    for mode in MODES:
        m = row["modes"][mode]
        label = "dense (`load`)" if mode == "load" else "packed (`--streaming`)"
        if not m["ok"]:
            lines.append(f"| {label} | failed: {m['error']} | | | |")
            continue
        lines.append(f"| {label} | {m['anon_peak'] / gib:.2f} | {m['anon_peak'] / row['gptq_bytes']:.2f} | "
                     f"{m['seconds']:.0f} | {m['mean_perplexity']:.2f} |")
    dense, packed = row["modes"]["load"], row["modes"]["use"]
    if dense["ok"] and packed["ok"]:
        ratio = packed["anon_peak"] / dense["anon_peak"]
        lines += ["", f"Packed anon peak {ratio:.2f}x the dense one (target ≤ {MEMORY_RATIO}x): "
                  f"{'met' if ratio <= MEMORY_RATIO else 'missed'}."]
    return lines
