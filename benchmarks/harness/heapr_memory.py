"""Extra memory of HEAPr's statistics and scoring (arXiv 2509.22299), measured on a fixture.

HEAPr scores neuron k of expert e by E_t[a_{t,k}^2] * w_k^T M_e w_k with M_e the (H, H) mean
outer product of the expert-output gradients. moecompress never forms M_e: the observer
accumulates (g'_t . w_k)^2 per token (`neuron_grad_proj`) next to a_{t,k}^2
(`neuron_act_sq`), two float64 (E, I) sums per layer and calibration domain, so the
statistics cost O(E x I) per layer instead of the O(E x H^2) of the matrices.

Three passes over the same calibration batches, each measured on its own:

* ``observer_forward``: the observer collecting only counts (no backward);
* ``plain_backward``: loss.backward() through the model with no observer, gradients wanted
  at the activations only (the same `requires_grad` set-up as the calibration pass): what any
  gradient-based statistic pays whatever it accumulates;
* ``heapr_observer``: the observer collecting HEAPr's statistics (count, neuron_act_sq,
  neuron_grad_proj) in whole-model mode, forward + backward.

HEAPr's extra memory = peak(heapr_observer) - peak(plain_backward), per MoE layer. Peaks are
live CPU tensor bytes (`peak_memory.tensor_peak`) in this process and, as a cross-check, RSS
high-water marks of fresh child processes (``python -m benchmarks.harness.heapr_memory``),
one per pass, reset after loading and a warm-up backward. The children run with glibc's
``MALLOC_MMAP_THRESHOLD_=65536`` so tensor buffers are mapped and unmapped individually and
RSS follows live memory (with the default, freed heap lingers and repeats differ by 10+ MB).
Peaks are per batch, so a few windows per domain suffice (`MEMORY_WINDOWS`); the
accumulators' size does not depend on how many windows are observed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.harness.context import Fixture, Protocol
from benchmarks.harness.peak_memory import current_rss, peak_rss, reset_peak_rss, rss_supported, tensor_peak
from moecompress.calibration.gradients import activation_gradients

HEAPR_STATISTICS = ("count", "neuron_act_sq", "neuron_grad_proj")
PASSES = ("observer_forward", "plain_backward", "heapr_observer")
FLOAT64_BYTES = 8
REPO = Path(__file__).resolve().parents[2]
MEMORY_WINDOWS = 8  # calibration windows per domain observed by the memory passes (one batch of 8)
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_RESULT_PREFIX = "HEAPR_MEMORY "


def _plain_backward(model: nn.Module, batches: list[tuple[str, torch.Tensor]]) -> None:
    """Forward + loss.backward() per batch, gradients at the activations only (no weight gradients)."""
    with activation_gradients(model):
        for _, ids in batches:
            with torch.enable_grad():
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()


def run_pass(name: str, model: nn.Module, adapter: Any, calib: Any, batch_size: int) -> Any:
    """Run one of PASSES over the calibration set; returns the observer (None for plain_backward)."""
    from moecompress.calibration.calibrate import collect_statistics
    from moecompress.calibration.request import ObservedPass

    if name == "plain_backward":
        _plain_backward(model, list(calib.domain_batches(batch_size)))
        return None
    statistics = ["count"] if name == "observer_forward" else list(HEAPR_STATISTICS)
    return collect_statistics(model, adapter, calib.input_ids, calib.domain_ids, calib.domains,
                              ObservedPass(statistics=statistics, batch_size=batch_size, mode="whole-model"), False)


def memory_calibration_set(fixture: Fixture, windows: int) -> Any:
    """`windows` (at most the protocol's) seeded calibration windows per domain of the fixture."""
    from moecompress.calibration.data import build_calibration_set

    protocol = fixture.protocol
    return build_calibration_set(fixture.tokenizer, fixture.calibration_sources(),
                                 num_samples=min(windows, protocol.calib_windows), seq_len=protocol.seq_len,
                                 seed=protocol.calib_seed)


def warm_up(model: nn.Module, calib: Any, batch_size: int) -> None:
    """One forward + backward on the first batch, so one-time allocations fall outside the measured passes."""
    _plain_backward(model, list(calib.domain_batches(batch_size))[:1])


def layer_shape(fixture: Fixture) -> dict[str, int]:
    """MoE layers, routed experts E, hidden size H and expert width I of the fixture."""
    layers = fixture.adapter.moe_layers(fixture.model)
    expert = fixture.adapter.expert_weights(layers[0], 0)
    return {"moe_layers": len(layers), "num_experts": layers[0].num_experts, "hidden": int(expert.down.shape[0]),
            "intermediate": int(expert.intermediate_size)}


def tensor_peaks(fixture: Fixture, calib: Any) -> dict[str, Any]:
    """Live-tensor peaks of every pass and of HEAPr scoring + selection, plus the accumulators' real size."""
    from moecompress.calibration.calibrate import build_stats
    from moecompress.prune.run import plan_pruning
    from moecompress.prune.request import PruneRequest

    model, adapter, batch_size = fixture.model, fixture.adapter, fixture.protocol.batch_size
    warm_up(model, calib, batch_size)
    peaks, observer = {}, None
    for name in PASSES:
        result, peaks[name] = tensor_peak(lambda name=name: run_pass(name, model, adapter, calib, batch_size))
        if name == "heapr_observer":
            observer = result
    assert observer is not None
    accumulators = {layer: sum(t.numel() * t.element_size() for stat in ("neuron_act_sq", "neuron_grad_proj")
                               for t in (per[stat] for per in obs.sums.values()))
                    for layer, obs in observer.observers.items()}
    stats = build_stats(model, observer, fixture.folder, calib.digest, {}, "whole-model",
                        fixture.protocol.calib_seed)
    _, scoring = tensor_peak(lambda: plan_pruning(stats, adapter, model.config,
        PruneRequest(method="heapr", ratio=0.5, protect_super_experts=False, allocation="global")))
    return {"peaks": peaks, "scoring_peak": scoring, "accumulator_bytes": accumulators}


def child_rss(fixture: Fixture, name: str, windows: int = MEMORY_WINDOWS) -> dict[str, int]:
    """Run pass `name` in a fresh interpreter; its RSS before the pass and its peak during it, bytes."""
    spec = {"name": fixture.name, "folder": str(fixture.folder), "corpus": str(fixture.corpus),
            "protocol": fixture.protocol.as_dict(), "pass": name, "threads": torch.get_num_threads(),
            "windows": windows}
    done = subprocess.run([sys.executable, "-m", "benchmarks.harness.heapr_memory", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, **CHILD_ENV})
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if done.returncode or not lines:
        raise RuntimeError(f"memory child for {fixture.name}/{name} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len(_RESULT_PREFIX):])


def _child(spec: dict[str, Any]) -> dict[str, int]:
    """Child process body: load, build the calibration set, warm up, reset the RSS peak, run one pass."""
    torch.set_num_threads(int(spec["threads"]))
    fixture = Fixture(name=spec["name"], folder=Path(spec["folder"]), corpus=Path(spec["corpus"]),
                      protocol=Protocol(**spec["protocol"]))
    calib = memory_calibration_set(fixture, int(spec["windows"]))
    model, adapter = fixture.model, fixture.adapter
    warm_up(model, calib, fixture.protocol.batch_size)
    reset_peak_rss()
    before = current_rss()
    run_pass(spec["pass"], model, adapter, calib, fixture.protocol.batch_size)
    return {"rss_before": before, "rss_peak": peak_rss()}


def measure(fixture: Fixture, rss: bool = True, windows: int = MEMORY_WINDOWS) -> dict[str, Any]:
    """One fixture's row: shape, accumulator size, the O(E x I) bound, and measured peaks per pass."""
    calib = memory_calibration_set(fixture, windows)
    shape = layer_shape(fixture)
    domains = len(calib.domains)
    experts, hidden, width = shape["num_experts"], shape["hidden"], shape["intermediate"]
    measured = tensor_peaks(fixture, calib)
    layers = shape["moe_layers"]
    row: dict[str, Any] = {
        "fixture": fixture.name, **shape, "domains": domains, "batch_size": fixture.protocol.batch_size,
        "seq_len": fixture.protocol.seq_len, "calibration_windows": int(calib.input_ids.shape[0]),
        "accumulator_bytes_per_layer": max(measured["accumulator_bytes"].values()),
        "bound_bytes_per_layer": 2 * domains * experts * width * FLOAT64_BYTES,  # two (E, I) float64 sums per domain
        "hessian_bytes_per_layer": domains * experts * hidden * hidden * FLOAT64_BYTES,  # M_e (H, H) per expert
        "tensor_peak_bytes": measured["peaks"],
        "scoring_peak_bytes": measured["scoring_peak"],
        "extra_tensor_bytes_per_layer": (measured["peaks"]["heapr_observer"] - measured["peaks"]["plain_backward"])
        / layers,
    }
    if rss and rss_supported():
        children = {name: child_rss(fixture, name, windows) for name in PASSES}
        row["rss"] = children
        above = {name: c["rss_peak"] - c["rss_before"] for name, c in children.items()}
        row["extra_rss_bytes_per_layer"] = (above["heapr_observer"] - above["plain_backward"]) / layers
    return row


if __name__ == "__main__":
    print(_RESULT_PREFIX + json.dumps(_child(json.loads(sys.argv[1]))), flush=True)
