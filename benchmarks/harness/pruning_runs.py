"""The mechanics behind the pruning-method suites: timed calibration, timed planning, evaluation.

* `calibrated(fixture, statistics)`: the observer pass (`collect_statistics` + `build_stats`,
  moecompress's own) over the fixture's calibration windows, collecting exactly one set of
  statistics, timed alone (tokenising the windows and loading the model are not in the time).
  Mode as `moecompress calibrate` picks it: whole-model for the gradient statistic, else one
  layer at a time where the adapter supports it. Results are cached per fixture folder,
  protocol and statistics set, with the time of the pass that produced them; an untimed
  one-window pass per mode first keeps one-time costs out of the times.
* `plan_timed`: `moecompress.prune.run.plan_pruning` (scoring + selection), timed; model-based
  scorers (NAEE) get the `ScoringContext` `prune_checkpoint` would give them.
* `evaluate_plan`: `moecompress.prune.materialize.materialize` (the product's own weight
  surgery, as `prune_checkpoint` writes it), then save + reload with plain transformers
  (`Fixture.reload_and_evaluate`). Stock layouts only.
* `evaluate_layout_checkpoint`: for plans no stock config can express (per-expert widths),
  `prune_checkpoint` writes moecompress's layout format, reopened with `moecompress.load`.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.context import Fixture
from moecompress.prune.request import PruneRequest

NEURON_MASKS = "prune_neurons.safetensors"  # bookkeeping written next to neuron-pruned weights, not weights


@dataclass(frozen=True)
class Calibration:
    """One observer pass: its statistics and how long the pass took."""

    stats: Any  # moecompress.calibration.stats.RoutingStats
    statistics: tuple[str, ...]
    mode: str
    seconds: float


_CALIBRATION_SETS: dict[tuple[str, str], Any] = {}
_CALIBRATIONS: dict[tuple[str, str, tuple[str, ...]], Calibration] = {}
_WARMED: set[tuple[str, str, str]] = set()


def _fixture_key(fixture: Fixture) -> tuple[str, str]:
    return str(fixture.folder), json.dumps(fixture.protocol.as_dict(), sort_keys=True)


def calibration_set(fixture: Fixture) -> Any:
    """The fixture's calibration windows (`CalibrationSet`), tokenised once per fixture and protocol."""
    from moecompress.calibration.data import build_calibration_set

    key = _fixture_key(fixture)
    if key not in _CALIBRATION_SETS:
        protocol = fixture.protocol
        _CALIBRATION_SETS[key] = build_calibration_set(fixture.tokenizer, fixture.calibration_sources(),
                                                       num_samples=protocol.calib_windows, seq_len=protocol.seq_len,
                                                       seed=protocol.calib_seed)
    return _CALIBRATION_SETS[key]


def method_statistics(method: str, params: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The statistics `moecompress prune` collects for `method` (super-expert protection off), sorted."""
    from moecompress.prune.run import required_statistics

    return tuple(sorted(required_statistics(method, False, params)))


def calibration_mode(fixture: Fixture, statistics: tuple[str, ...]) -> str:
    """The mode `moecompress calibrate` would use for these statistics on this fixture."""
    from moecompress.calibration.observer import GRADIENT_STATISTICS

    if any(name in GRADIENT_STATISTICS for name in statistics) or not fixture.adapter.layerwise_supported:
        return "whole-model"
    return "layerwise"


def calibrated(fixture: Fixture, statistics: tuple[str, ...]) -> Calibration:
    """Statistics of the fixture's calibration windows and the observer pass's time (cached)."""
    from moecompress.calibration.calibrate import build_stats, collect_statistics
    from moecompress.calibration.request import ObservedPass

    statistics = tuple(sorted(statistics))
    key = (*_fixture_key(fixture), statistics)
    if key not in _CALIBRATIONS:
        calib = calibration_set(fixture)
        protocol = fixture.protocol
        mode = calibration_mode(fixture, statistics)
        model, adapter = fixture.model, fixture.adapter
        if (*key[:2], mode) not in _WARMED:  # the first pass in a mode pays one-time costs: keep them out of the time
            first = calib.domain_ids == calib.domain_ids[0]
            collect_statistics(model, adapter, calib.input_ids[first][:1], calib.domain_ids[first][:1], calib.domains,
                               ObservedPass(statistics=list(statistics), batch_size=1, mode=mode), False)
            _WARMED.add((*key[:2], mode))
        torch.manual_seed(protocol.calib_seed)
        started = time.perf_counter()
        observer = collect_statistics(model, adapter, calib.input_ids, calib.domain_ids, calib.domains,
                                      ObservedPass(statistics=list(statistics), batch_size=protocol.batch_size,
                                                   mode=mode), False)
        stats = build_stats(model, observer, fixture.folder, calib.digest,
                            {"sources": calib.sources, "seq_len": calib.seq_len,
                             "num_samples_per_domain": protocol.calib_windows, "seed": protocol.calib_seed,
                             "batch_size": protocol.batch_size, "dtype": "float32"}, mode, protocol.calib_seed)
        _CALIBRATIONS[key] = Calibration(stats, statistics, mode, time.perf_counter() - started)
    return _CALIBRATIONS[key]


def scoring_context(fixture: Fixture, method: str, params: dict[str, Any] | None) -> Any:
    """The `ScoringContext` a model-based scorer gets from `prune_checkpoint` (None for statistics-only scorers)."""
    from moecompress.prune.scorers import ScoringContext, get_scorer

    if not get_scorer(method).uses_model(params):
        return None
    protocol = fixture.protocol
    batches = list(calibration_set(fixture).domain_batches(protocol.batch_size))
    return ScoringContext(model=fixture.model, adapter=fixture.adapter, batches=batches, seed=protocol.calib_seed,
                          progress=False)


def plan_timed(fixture: Fixture, calibration: Calibration, method: str, ratio: float,
               params: dict[str, Any] | None = None, domain: str | None = None,
               allocation: str = "uniform") -> tuple[Any, float]:
    """(`PrunePlan`, seconds of scoring + selection) with super-expert protection off."""
    from moecompress.prune.run import plan_pruning

    context = scoring_context(fixture, method, params)
    started = time.perf_counter()
    request = PruneRequest(method=method, ratio=ratio, params=params, domain=domain, protect_super_experts=False,
                           allocation=allocation)
    plan = plan_pruning(calibration.stats, fixture.adapter, fixture.model.config, request, context=context)
    return plan, time.perf_counter() - started


def evaluate_plan(fixture: Fixture, plan: Any) -> dict[str, Any]:
    """Materialise a uniform plan on the fixture's model, save, reload with transformers, evaluate."""
    from moecompress.prune.materialize import materialize

    pruned, layout, _ = materialize(fixture.model, fixture.adapter, plan)
    if layout is not None:  # materialize changed the fixture's model in place: it must not be reused
        raise RuntimeError("evaluate_plan takes uniform plans only; use evaluate_layout_checkpoint")
    result = fixture.reload_and_evaluate(pruned)
    result["format"] = "transformers"
    return result


def evaluate_layout_checkpoint(fixture: Fixture, calibration: Calibration, method: str, ratio: float,
                               allocation: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """`prune_checkpoint` into a temporary folder, reopen with `moecompress.load`, evaluate.

    parameters: the pruned model's count without in-memory padding (`PruneResult.params_after`);
    bytes_on_disk: the weight files (the neuron-mask bookkeeping file excluded).
    """
    import moecompress
    from moecompress.prune.run import prune_checkpoint

    protocol = fixture.protocol
    with tempfile.TemporaryDirectory(prefix="moecompress-bench-") as tmp:
        output = Path(tmp) / "pruned"
        request = PruneRequest(method=method, ratio=ratio, params=params, sources=fixture.calibration_sources(),
                               samples=protocol.calib_windows, seq_len=protocol.seq_len, seed=protocol.calib_seed,
                               batch_size=protocol.batch_size, protect_super_experts=False, allocation=allocation)
        done = prune_checkpoint(fixture.folder, output, request, stats=calibration.stats, progress=False)
        model = moecompress.load(output, dtype="float32")
        result = fixture.evaluate(model)
        result["parameters"] = done.params_after
        result["bytes_on_disk"] = sum(f.stat().st_size for f in output.glob("*.safetensors") if f.name != NEURON_MASKS)
        result["format"] = done.format
    result.pop("model_path", None)
    return result
