"""Named benchmark suites: each measures fixtures and returns JSON-ready rows.

A suite is a function (fixtures, options) -> dict registered with `@suite(name, title)`.
`benchmarks/run.py` runs the requested suites, stores each one's raw JSON and renders all
stored results into RESULTS.md (see `report.py`).

Suites here:
* ``unpruned``: per-domain test perplexity of every fixture as trained.
* ``pruning-baselines``: uniform expert pruning at 25/50/75% of routed experts with the
  ``random`` scorer (mean over seeds) and the ``frequency`` scorer (tokens routed per expert,
  calibrated on every domain's validation split). Scoring and selection are moecompress's own
  (`moecompress.prune`), super-expert protection off: these are the plain baselines.
* ``domain-pruning``: frequency pruning at 50% calibrated on ONE domain's validation split,
  evaluated on every domain, next to the all-domain calibration.
"""

from __future__ import annotations

import statistics as pystats
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from benchmarks.harness.context import Fixture

SuiteFn = Callable[[list[Fixture], dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Suite:
    """A registered suite."""

    name: str
    title: str
    fn: SuiteFn


SUITES: dict[str, Suite] = {}

# Further suites live in their own modules (one per area), each registering with `@suite` and
# its renderer with `report.renderer`; `load_suite_modules` imports them.
SUITE_MODULES = (
    "benchmarks.harness.pruning_methods",
    "benchmarks.harness.scoring_order",
    "benchmarks.harness.expert_merging",
    "benchmarks.harness.quantisation",
    "benchmarks.harness.packed_loading",
    "benchmarks.harness.gguf_allocation",
    "benchmarks.harness.condensing",
    "benchmarks.harness.costs",
    "benchmarks.scale.suite",
    "benchmarks.serving.suite",
)


def load_suite_modules() -> dict[str, Suite]:
    """Import every suite module (so their suites and renderers register); returns SUITES."""
    import importlib

    for module in SUITE_MODULES:
        importlib.import_module(module)
    return SUITES


def suite(name: str, title: str) -> Callable[[SuiteFn], SuiteFn]:
    """Register a suite under `name`."""

    def wrap(fn: SuiteFn) -> SuiteFn:
        SUITES[name] = Suite(name, title, fn)
        return fn

    return wrap


def _domain_ppl(result: dict[str, Any]) -> dict[str, float]:
    return {entry["domain"]: entry["perplexity"] for entry in result["domains"]}


def _windows(result: dict[str, Any]) -> dict[str, int]:
    return {entry["domain"]: entry["windows"] for entry in result["domains"]}


def prune_and_evaluate(fixture: Fixture, method: str, ratio: float, params: dict[str, Any] | None = None,
                       domain: str | None = None) -> dict[str, Any]:
    """Plan with a moecompress scorer, drop the experts, save, reload with transformers, evaluate."""
    from moecompress.prune.run import plan_pruning
    from moecompress.prune.request import PruneRequest

    stats = fixture.stats(("count",))
    plan = plan_pruning(stats, fixture.adapter, fixture.model.config,
        PruneRequest(method=method, ratio=ratio, params=params, domain=domain, protect_super_experts=False))
    pruned = fixture.adapter.drop(fixture.model, keep_experts=plan.keep)
    result = fixture.reload_and_evaluate(pruned)
    result["kept_per_layer"] = next(iter(plan.kept_counts().values()))
    result["keep"] = {str(layer): ids for layer, ids in plan.keep.items()}
    return result


def infeasible(fixture: Fixture, ratio: float) -> str | None:
    """Why the router cannot keep (1 - ratio) of its experts (None when it can)."""
    from moecompress.errors import MoecompressError
    from moecompress.prune.run import routing_shape
    from moecompress.prune.select import kept_count

    try:
        kept_count(routing_shape(fixture.adapter, fixture.model.config), ratio=ratio)
    except MoecompressError as err:
        return str(err)
    return None


def feasible_pairs(fixtures: list[Fixture], ratios: Sequence[float]
                   ) -> tuple[list[tuple[Fixture, float]], list[dict[str, Any]]]:
    """((fixture, ratio) pairs the routers can keep, skipped pairs with the reason), fixtures first."""
    pairs, skipped = [], []
    for fixture in fixtures:
        for ratio in ratios:
            reason = infeasible(fixture, ratio)
            if reason:
                skipped.append({"fixture": fixture.name, "ratio": ratio, "reason": reason})
            else:
                pairs.append((fixture, ratio))
    return pairs, skipped


def rows_by_fixture(data: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(fixture info, its rows) for every fixture of a stored suite that has rows, in the stored order."""
    out = []
    for info in data["fixtures"]:
        rows = [row for row in data["rows"] if row["fixture"] == info["fixture"]]
        if rows:
            out.append((info, rows))
    return out


def best_and_share(rows: list[dict[str, Any]], reference: dict[str, Any] | None, unpruned: float
                   ) -> tuple[dict[str, Any] | None, float | None]:
    """(the row with the lowest mean perplexity, its increase over `unpruned` as a share of `reference`'s).

    The share is None when there are no rows, no reference or the reference did not increase.
    """
    if not rows or reference is None:
        return None, None
    best = min(rows, key=lambda row: row["mean_perplexity"])
    rise = reference["mean_perplexity"] - unpruned
    return best, ((best["mean_perplexity"] - unpruned) / rise if rise > 0 else None)


@suite("unpruned", "Unpruned fixtures: test perplexity per domain")
def unpruned(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Per-domain test perplexity of every fixture as trained."""
    rows = []
    for fixture in fixtures:
        started = time.perf_counter()
        result = fixture.unpruned
        record = fixture.record
        rows.append({
            "fixture": fixture.name,
            "model_type": record["spec"]["model_type"],
            "num_experts": fixture.adapter.num_experts(fixture.model.config),
            "top_k": fixture.adapter.top_k(fixture.model.config),
            "parameters": result["parameters"],
            "training_steps": record["training"]["steps"],
            "training_minutes": round(record["training"]["seconds"] / 60, 1),
            "perplexity": _domain_ppl(result),
            "mean_perplexity": result["mean_perplexity"],
            "windows": _windows(result),
            "seconds": round(time.perf_counter() - started, 1),
        })
    return {"rows": rows}


@suite("pruning-baselines", "Pruning baselines: random and frequency, uniform per layer")
def pruning_baselines(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Random (mean over seeds) and frequency pruning at each ratio, per fixture."""
    ratios: Sequence[float] = options.get("ratios", (0.25, 0.5, 0.75))
    seeds: Sequence[int] = options.get("seeds", (0, 1, 2))
    rows = []
    jobs = [(f, r) for f in fixtures for r in ratios]
    skipped = []
    for fixture, ratio in tqdm(jobs, desc="pruning baselines", unit="ratio"):
        reason = infeasible(fixture, ratio)
        if reason:
            skipped.append({"fixture": fixture.name, "ratio": ratio, "reason": reason})
            continue
        base = fixture.unpruned
        random_runs = [prune_and_evaluate(fixture, "random", ratio, params={"seed": seed}) for seed in seeds]
        frequency = prune_and_evaluate(fixture, "frequency", ratio)
        domains = list(_domain_ppl(base))
        random_ppl = {d: pystats.fmean(_domain_ppl(run)[d] for run in random_runs) for d in domains}
        random_means = [run["mean_perplexity"] for run in random_runs]
        common = {"fixture": fixture.name, "ratio": ratio, "kept_per_layer": frequency["kept_per_layer"],
                  "unpruned_mean": base["mean_perplexity"], "windows": _windows(base)}
        rows.append({**common, "method": f"random (mean of {len(seeds)} seeds)", "perplexity": random_ppl,
                     "mean_perplexity": pystats.fmean(random_means),
                     "mean_perplexity_std": pystats.pstdev(random_means) if len(random_means) > 1 else 0.0,
                     "per_seed": [{"seed": s, "perplexity": _domain_ppl(r), "mean_perplexity": r["mean_perplexity"]}
                                  for s, r in zip(seeds, random_runs)]})
        rows.append({**common, "method": "frequency", "perplexity": _domain_ppl(frequency),
                     "mean_perplexity": frequency["mean_perplexity"], "keep": frequency["keep"]})
    return {"rows": rows, "ratios": list(ratios), "seeds": list(seeds), "skipped": skipped}


@suite("domain-pruning", "Domain-specific pruning: frequency calibrated on one domain")
def domain_pruning(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Frequency pruning calibrated on each domain alone (and on all), evaluated on every domain."""
    ratio: float = options.get("domain_ratio", 0.5)
    rows = []
    for fixture in tqdm(fixtures, desc="domain pruning", unit="fixture"):
        if infeasible(fixture, ratio):
            continue
        for domain in [None] + fixture.domains:
            result = prune_and_evaluate(fixture, "frequency", ratio, domain=domain)
            rows.append({
                "fixture": fixture.name, "ratio": ratio, "calibrated_on": domain or "all domains",
                "kept_per_layer": result["kept_per_layer"], "perplexity": _domain_ppl(result),
                "unpruned": _domain_ppl(fixture.unpruned),
                "mean_perplexity": result["mean_perplexity"], "windows": _windows(result),
            })
    return {"rows": rows, "ratio": ratio}
