"""Pruning methods on the fixtures: every scorer against the baselines, domain calibration, HEAPr's memory.

* ``pruning-methods``: every registered expert-level scorer of `moecompress.prune.scorers`
  (random as the mean over the run's seeds) and every neuron-level one (HEAPr) at 25/50/75% of
  routed experts removed, uniform per layer, super-expert protection off. HEAPr removes the
  same fraction of every routed expert's neurons (so the same fraction of routed-expert
  parameters), written in the uniform-width layout plain transformers loads; where the
  architecture cannot express that width (shared experts sized by the same config key) it
  falls back to HEAPr's own global ranking in moecompress's layout format, said in the row.
  Calibration (the observer pass collecting a method's statistics) and scoring + selection
  are timed separately. Check: at 50%, the best non-baseline method's mean-perplexity increase
  over unpruned against frequency's (target: at most half, on at least one fixture), and any
  method whose mean perplexity is worse than random's at the same ratio (target: none).
* ``domain-methods``: EASY-EP and PreMoe at 50% calibrated on each domain alone and on all
  domains, evaluated on every domain. Check: for how many domains calibrating on the domain
  itself keeps that domain's perplexity closer to unpruned than the mixed calibration.
* ``heapr-memory``: HEAPr's extra memory per MoE layer (statistics + scoring) against the
  O(E x I) size of its accumulators (`benchmarks.harness.heapr_memory`).

Scoring, selection, weight surgery and calibration are moecompress's own
(`benchmarks.harness.pruning_runs`); every pruned model is saved and reopened with the loader a
user would use before it is evaluated.
"""

from __future__ import annotations

import math
import statistics as pystats
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from benchmarks.harness.context import Fixture
from benchmarks.harness.heapr_memory import MEMORY_WINDOWS
from benchmarks.harness.heapr_memory import measure as measure_heapr_memory
from benchmarks.harness.pruning_runs import (calibrated, evaluate_layout_checkpoint, evaluate_plan, method_statistics,
                                             plan_timed)
from benchmarks.harness.report import _fmt, domain_matrix, renderer
from benchmarks.harness.suites import _domain_ppl, _windows, feasible_pairs, infeasible, suite

RATIOS = (0.25, 0.5, 0.75)
BASELINES = ("random", "frequency", "soft_count")  # the scorers registered as baselines
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    # exhaustive where C(E, kept) <= 100 subsets (the 8-expert fixture), greedy elsewhere; 2048 tokens per layer
    "naee": {"search": "auto", "max_subsets": 100, "max_tokens": 2048},
}
TARGET_RATIO = 0.5  # the ratio the method target is checked at
TARGET_SHARE = 0.5  # best method's increase at most this share of frequency's
DOMAIN_METHODS = ("easy_ep", "premoe")
MEMORY_TARGET_MB = 4.0  # "a few MB per layer"


def expert_methods() -> list[str]:
    """Every registered expert-level scorer, baselines first."""
    from moecompress.prune.scorers import available_scorers

    names = [name for name, scorer in available_scorers().items() if scorer.granularity == "expert"]
    return [b for b in BASELINES if b in names] + sorted(set(names) - set(BASELINES))


def neuron_methods() -> list[str]:
    """Every registered neuron-level scorer (HEAPr)."""
    from moecompress.prune.scorers import available_scorers

    return [name for name, scorer in available_scorers().items() if scorer.granularity == "neuron"]


def neuron_allocation(fixture: Fixture) -> tuple[str, str | None]:
    """("uniform", None) where a stock config can hold a narrower expert width, else ("global", why not)."""
    from moecompress.errors import MoecompressError

    try:
        fixture.adapter.check_width_patchable(fixture.model.config)
    except MoecompressError as err:
        return "global", str(err)
    return "uniform", None


def naee_search(fixture: Fixture, kept: int, params: dict[str, Any]) -> str:
    """The subset search NAEE runs at `kept` experts per layer with these parameters."""
    from moecompress.prune.run import routing_shape
    from moecompress.prune.scorers import get_scorer

    parsed = get_scorer("naee").parse_params(params)
    if parsed.search != "auto":
        return parsed.search
    shape = routing_shape(fixture.adapter, fixture.model.config)
    groups = shape.groups[0] if shape.groups else 1
    subsets = math.comb(shape.num_experts // groups, kept // groups) ** groups
    return "exhaustive" if subsets <= parsed.max_subsets else "greedy"


def _measured(result: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    return {"perplexity": _domain_ppl(result), "mean_perplexity": result["mean_perplexity"],
            "x_unpruned": result["mean_perplexity"] / base["mean_perplexity"], "parameters": result["parameters"],
            "bytes_on_disk": result["bytes_on_disk"], "format": result.get("format", "transformers")}


def _expert_row(fixture: Fixture, method: str, ratio: float, params: dict[str, Any], seeds: Sequence[int]
                ) -> dict[str, Any]:
    """Plan, prune, reload and evaluate one expert scorer (random: once per seed, averaged)."""
    base = fixture.unpruned
    calibration = calibrated(fixture, method_statistics(method, params))
    runs = []
    for seed in (seeds if method == "random" else [None]):
        run_params = params if seed is None else {**params, "seed": seed}
        plan, seconds = plan_timed(fixture, calibration, method, ratio, run_params)
        runs.append((seed, plan, seconds, evaluate_plan(fixture, plan)))
    _, plan, _, first = runs[0]
    kept = next(iter(plan.kept_counts().values()))
    row = {"method": method, "granularity": "expert", "params": params, "kept_per_layer": kept,
           "statistics": list(calibration.statistics), "calibration_mode": calibration.mode,
           "calibration_s": calibration.seconds, "scoring_s": pystats.fmean(r[2] for r in runs),
           **_measured(first, base)}
    if method == "naee":
        row["search"] = naee_search(fixture, kept, params)
    if method == "random":
        domains = list(row["perplexity"])
        means = [r[3]["mean_perplexity"] for r in runs]
        row.update(seeds=list(seeds), mean_perplexity=pystats.fmean(means),
                   mean_perplexity_std=pystats.pstdev(means) if len(means) > 1 else 0.0,
                   perplexity={d: pystats.fmean(_domain_ppl(r[3])[d] for r in runs) for d in domains},
                   per_seed=[{"seed": s, "perplexity": _domain_ppl(r), "mean_perplexity": r["mean_perplexity"]}
                             for s, _, _, r in runs])
        row["x_unpruned"] = row["mean_perplexity"] / base["mean_perplexity"]
    else:
        row["keep"] = {str(layer): ids for layer, ids in plan.keep.items()}
    return row


def _neuron_row(fixture: Fixture, method: str, ratio: float, params: dict[str, Any]) -> dict[str, Any]:
    """Plan, prune, reopen and evaluate one neuron scorer at the same fraction of routed-expert neurons."""
    allocation, why = neuron_allocation(fixture)
    calibration = calibrated(fixture, method_statistics(method, params))
    plan, seconds = plan_timed(fixture, calibration, method, ratio, params, allocation=allocation)
    if allocation == "uniform":
        result = evaluate_plan(fixture, plan)
    else:
        result = evaluate_layout_checkpoint(fixture, calibration, method, ratio, allocation, params)
    widths = [w for per in plan.widths.values() for w in per]
    return {"method": method, "granularity": "neuron", "params": params, "allocation": allocation,
            "allocation_note": why, "kept_per_layer": plan.num_experts, "kept_width": min(widths),
            "kept_width_max": max(widths), "intermediate_size": plan.intermediate_size,
            "neurons_kept": plan.neuron_fraction_kept(), "statistics": list(calibration.statistics),
            "calibration_mode": calibration.mode, "calibration_s": calibration.seconds, "scoring_s": seconds,
            **_measured(result, fixture.unpruned)}


@suite("pruning-methods", "Pruning methods: every scorer and HEAPr against the baselines")
def pruning_methods(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Every expert scorer and neuron scorer x ratio x fixture, with calibration and scoring times."""
    ratios: Sequence[float] = options.get("ratios", RATIOS)
    seeds: Sequence[int] = options.get("seeds", (0, 1, 2))
    params = {**DEFAULT_PARAMS, **options.get("method_params", {})}
    experts, neurons = expert_methods(), neuron_methods()
    fixture_info = [_fixture_info(fixture) for fixture in fixtures]
    pairs, skipped = feasible_pairs(fixtures, ratios)
    jobs = [(fixture, ratio, method) for fixture, ratio in pairs for method in experts + neurons]
    rows = []
    bar = tqdm(jobs, desc="pruning methods", unit="run")
    for fixture, ratio, method in bar:
        bar.set_postfix_str(f"{fixture.name} {ratio:.0%} {method}")
        method_params = dict(params.get(method, {}))
        row = (_neuron_row(fixture, method, ratio, method_params) if method in neurons
               else _expert_row(fixture, method, ratio, method_params, seeds))
        rows.append({"fixture": fixture.name, "ratio": ratio, "windows": _windows(fixture.unpruned), **row})
    return {"rows": rows, "fixtures": fixture_info, "ratios": list(ratios), "seeds": list(seeds),
            "baselines": list(BASELINES), "target_ratio": TARGET_RATIO, "target_share": TARGET_SHARE,
            "skipped": skipped}


def _fixture_info(fixture: Fixture) -> dict[str, Any]:
    base = fixture.unpruned
    return {"fixture": fixture.name, "perplexity": _domain_ppl(base), "mean_perplexity": base["mean_perplexity"],
            "parameters": base["parameters"], "num_experts": fixture.adapter.num_experts(fixture.model.config),
            "top_k": fixture.adapter.top_k(fixture.model.config), "windows": _windows(base)}


def method_checks(data: dict[str, Any], fixture: str) -> dict[str, Any]:
    """The two targets on one fixture, from the rows.

    best: the non-baseline method with the lowest mean perplexity at the target ratio;
    share: its increase over unpruned / frequency's increase (None when frequency's is not
    positive); worse_than_random: (ratio, method) pairs whose mean perplexity exceeds random's.
    """
    rows = [row for row in data["rows"] if row["fixture"] == fixture]
    unpruned = next(info for info in data["fixtures"] if info["fixture"] == fixture)["mean_perplexity"]
    at_target = {row["method"]: row for row in rows if row["ratio"] == data["target_ratio"]}
    candidates = [row for name, row in at_target.items() if name not in data["baselines"]]
    out: dict[str, Any] = {"best": None, "share": None, "met": False, "worse_than_random": []}
    if candidates and "frequency" in at_target:
        best = min(candidates, key=lambda row: row["mean_perplexity"])
        rise_best = best["mean_perplexity"] - unpruned
        rise_frequency = at_target["frequency"]["mean_perplexity"] - unpruned
        share = rise_best / rise_frequency if rise_frequency > 0 else None
        out.update(best=best["method"], rise_best=rise_best, rise_frequency=rise_frequency, share=share,
                   met=share is not None and share <= data["target_share"])
    for ratio in sorted({row["ratio"] for row in rows}):
        same = {row["method"]: row for row in rows if row["ratio"] == ratio}
        if "random" in same:
            out["worse_than_random"] += [(ratio, name) for name, row in same.items()
                                         if row["mean_perplexity"] > same["random"]["mean_perplexity"]]
    return out


def _label(row: dict[str, Any]) -> str:
    if row["method"] == "random":
        return f"random (mean of {len(row['seeds'])} seeds)"
    if row["method"] == "naee":
        return f"naee ({row['search']})"
    if row["granularity"] == "neuron":
        return f"{row['method']} (neurons, {row['allocation']}{'' if row['format'] == 'transformers' else ', layout'})"
    return row["method"]


def _kept(row: dict[str, Any]) -> str:
    if row["granularity"] == "neuron":
        width = (str(row["kept_width"]) if row["kept_width"] == row["kept_width_max"]
                 else f"{row['kept_width']}-{row['kept_width_max']}")
        return f"{row['kept_per_layer']} x {width}/{row['intermediate_size']} neurons"
    return f"{row['kept_per_layer']} experts"


@renderer("pruning-methods")
def render_methods(data: dict[str, Any]) -> list[str]:
    """One table per fixture (method x ratio) with both target checks, then the targets over fixtures."""
    lines: list[str] = []
    results = {}
    naee = next((row for row in data["rows"] if row["method"] == "naee"), None)
    for info in data["fixtures"]:
        fixture = info["fixture"]
        rows = [row for row in data["rows"] if row["fixture"] == fixture]
        if not rows:
            continue
        domains = list(info["perplexity"])
        notes = [f"Unpruned: mean perplexity {_fmt(info['mean_perplexity'])} "
                 f"({', '.join(f'{d} {_fmt(v)}' for d, v in info['perplexity'].items())}), "
                 f"{info['parameters'] / 1e6:.2f} M parameters, {info['num_experts']} routed experts, "
                 f"top-{info['top_k']}; windows per domain: "
                 f"{', '.join(f'{d} {n}' for d, n in info['windows'].items())}."]
        layouts = {row["allocation_note"] for row in rows if row.get("allocation_note")}
        if layouts:
            notes.append(f"HEAPr: uniform width is not expressible here ({'; '.join(sorted(layouts))}), so it uses "
                         "its own global ranking, written in moecompress's layout format and reopened with "
                         "`moecompress.load`.")
        lines += [f"### {fixture}", "", " ".join(notes), "",
                  "| removed | method | kept / layer | " + " | ".join(domains)
                  + " | mean | x unpruned | params | size | calib s | score s |",
                  "|---:|---|---:|" + "---:|" * len(domains) + "---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            ppl = " | ".join(_fmt(row["perplexity"][d]) for d in domains)
            spread = f" ± {_fmt(row['mean_perplexity_std'])}" if row.get("mean_perplexity_std") else ""
            lines.append(f"| {row['ratio']:.0%} | {_label(row)} | {_kept(row)} | {ppl} | "
                         f"**{_fmt(row['mean_perplexity'])}**{spread} | {row['x_unpruned']:.2f} | "
                         f"{row['parameters'] / 1e6:.2f} M | {row['bytes_on_disk'] / 2**20:.2f} MiB | "
                         f"{row['calibration_s']:.1f} | {row['scoring_s']:.2f} |")
        check = results[fixture] = method_checks(data, fixture)
        target = f"{data['target_ratio']:.0%}"
        if check["best"] is None:
            first = f"at {target}: no non-baseline method and frequency to compare"
        elif check["share"] is None:
            first = (f"at {target}: best method {check['best']} (+{_fmt(check['rise_best'])} mean perplexity over "
                     f"unpruned); frequency's increase is {_fmt(check['rise_frequency'])}, so the share is undefined "
                     "(not met)")
        else:
            first = (f"at {target}: best method {check['best']} raises mean perplexity by "
                     f"{_fmt(check['rise_best'])} over unpruned, frequency by {_fmt(check['rise_frequency'])}: "
                     f"share {check['share']:.2f} (target at most {data['target_share']:.2f}: "
                     f"{'met' if check['met'] else 'not met'})")
        worse = ", ".join(f"{name} at {ratio:.0%}" for ratio, name in check["worse_than_random"]) or "none"
        lines += ["", f"Check: {first}; methods with a mean perplexity worse than random's at the same ratio: "
                      f"{worse}.", ""]
    if results:
        met = [name for name, check in results.items() if check["met"]]
        worse = [f"{name}: {m} at {r:.0%}" for name, check in results.items() for r, m in check["worse_than_random"]]
        lines += ["Targets over all fixtures: best method's increase at most "
                  f"{data['target_share']:.0%} of frequency's at {data['target_ratio']:.0%} on at least one fixture: "
                  f"{'met' if met else 'not met'} ({len(met)} of {len(results)}: {', '.join(met) or 'none'}); "
                  f"no method worse than random: {'met' if not worse else 'not met (' + '; '.join(worse) + ')'}.", ""]
    lines += ["Baselines (not candidates for best method): " + ", ".join(data["baselines"]) + ". Random: per-domain "
              "means over seeds, ± the standard deviation of the mean perplexity over seeds. Neuron rows remove the "
              "same fraction of every routed expert's neurons as the expert rows remove experts. params: parameters "
              "of the reloaded model; size: its safetensors weights (float32). calib s: the observer pass collecting "
              "the method's statistics (with `count`), shared by methods that need the same set; score s: scoring + "
              "selection (`plan_pruning`), NAEE's including its layer-input pass."
              + (f" NAEE parameters: {naee['params']}." if naee else "")]
    for item in data.get("skipped", []):
        lines.append(f"- {item['fixture']} at {item['ratio']:.0%}: not run ({item['reason']})")
    return lines


@suite("domain-methods", "Domain-specific pruning: EASY-EP and PreMoe calibrated on one domain")
def domain_methods(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """EASY-EP and PreMoe at 50% calibrated on each domain alone and on all, evaluated on every domain."""
    ratio: float = options.get("domain_ratio", 0.5)
    methods: Sequence[str] = options.get("domain_methods", DOMAIN_METHODS)
    rows, skipped = [], []
    jobs = [(f, m, d) for f in fixtures for m in methods for d in [None] + f.domains]
    for fixture, method, domain in tqdm(jobs, desc="domain methods", unit="run"):
        reason = infeasible(fixture, ratio)
        if reason:
            if not any(s["fixture"] == fixture.name for s in skipped):
                skipped.append({"fixture": fixture.name, "ratio": ratio, "reason": reason})
            continue
        calibration = calibrated(fixture, method_statistics(method))
        plan, seconds = plan_timed(fixture, calibration, method, ratio, domain=domain)
        result = evaluate_plan(fixture, plan)
        rows.append({"fixture": fixture.name, "method": method, "ratio": ratio,
                     "calibrated_on": domain or "all domains",
                     "kept_per_layer": next(iter(plan.kept_counts().values())), "perplexity": _domain_ppl(result),
                     "unpruned": _domain_ppl(fixture.unpruned), "mean_perplexity": result["mean_perplexity"],
                     "scoring_s": seconds, "windows": _windows(result)})
    return {"rows": rows, "ratio": ratio, "methods": list(methods), "skipped": skipped}


def domain_checks(rows: list[dict[str, Any]]) -> list[str]:
    """Domains whose own calibration keeps their perplexity closer to unpruned than the all-domain one."""
    mixed = next(row for row in rows if row["calibrated_on"] == "all domains")
    base = mixed["unpruned"]
    return [row["calibrated_on"] for row in rows if row["calibrated_on"] in base
            and abs(row["perplexity"][row["calibrated_on"]] - base[row["calibrated_on"]])
            < abs(mixed["perplexity"][row["calibrated_on"]] - base[row["calibrated_on"]])]


@renderer("domain-methods")
def render_domain_methods(data: dict[str, Any]) -> list[str]:
    """Per fixture and method: calibration domain x evaluated domain, and the own-versus-mixed check."""
    lines: list[str] = []
    fixtures = list(dict.fromkeys(row["fixture"] for row in data["rows"]))
    totals: dict[str, list[int]] = {}
    for fixture in fixtures:
        for method in data["methods"]:
            rows = [r for r in data["rows"] if r["fixture"] == fixture and r["method"] == method]
            if not rows:
                continue
            base = rows[0]["unpruned"]
            lines += [f"### {fixture}: {method}", ""] + domain_matrix(rows, method)
            wins = domain_checks(rows)
            singles = [row["calibrated_on"] for row in rows if row["calibrated_on"] in base]
            totals.setdefault(method, [0, 0])
            totals[method][0] += len(wins)
            totals[method][1] += len(singles)
            lines += ["", f"Check: calibrating {method} on a domain keeps that domain's perplexity closer to unpruned "
                          f"than the all-domain calibration for {len(wins)} of {len(singles)} domains "
                          f"({', '.join(wins) or 'none'}).", ""]
    if totals:
        lines.append("Over all fixtures: " + "; ".join(f"{method} {won} of {total} domains"
                                                       for method, (won, total) in totals.items()) + ".")
    for item in data.get("skipped", []):
        lines.append(f"- {item['fixture']} at {item['ratio']:.0%}: not run ({item['reason']})")
    return lines


@suite("heapr-memory", "HEAPr memory: extra memory of its statistics and scoring per MoE layer")
def heapr_memory(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Accumulator sizes, the O(E x I) bound, and measured peaks of HEAPr's passes on each fixture."""
    rss = bool(options.get("memory_rss", True))
    windows = int(options.get("memory_windows", MEMORY_WINDOWS))
    rows = [measure_heapr_memory(fixture, rss=rss, windows=windows)
            for fixture in tqdm(fixtures, desc="heapr memory", unit="fixture")]
    return {"rows": rows, "target_mb_per_layer": options.get("memory_target_mb", MEMORY_TARGET_MB)}


def _mb(value: float) -> str:
    return f"{value / 2**20:.2f}"


@renderer("heapr-memory")
def render_heapr_memory(data: dict[str, Any]) -> list[str]:
    """Table: per fixture the accumulators, the bounds and the measured extra per MoE layer; the target check."""
    target = data["target_mb_per_layer"]
    lines = ["MiB per MoE layer unless stated. accumulators: HEAPr's two float64 (E, I) sums per domain, as allocated; "
             "O(E x I) bound: 2 x domains x E x I x 8 bytes; H x H matrices: what one M_e per expert and domain "
             "would take instead. Peaks (MiB, whole pass): live CPU tensor bytes (torch profiler) of the observer "
             "forward with counts only, of a plain loss.backward() without observer, and of the HEAPr observer "
             "(forward + backward); extra = HEAPr observer - plain backward, per MoE layer. RSS: the same difference "
             "of peak RSS above the pre-pass RSS in fresh processes (one per pass). scoring: peak of HEAPr scoring + "
             "selection (`plan_pruning`, global ranking at 50%) over the whole model, after calibration.", "",
             "| fixture | E x I (H) | MoE layers | accumulators | O(E x I) bound | H x H matrices | peak forward | "
             "peak backward | peak HEAPr | extra (tensors) | extra (RSS) | scoring |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    within = []
    for row in data["rows"]:
        peaks = row["tensor_peak_bytes"]
        rss = _mb(row["extra_rss_bytes_per_layer"]) if "extra_rss_bytes_per_layer" in row else "not measured"
        lines.append(f"| {row['fixture']} | {row['num_experts']} x {row['intermediate']} ({row['hidden']}) | "
                     f"{row['moe_layers']} | {_mb(row['accumulator_bytes_per_layer'])} | "
                     f"{_mb(row['bound_bytes_per_layer'])} | {_mb(row['hessian_bytes_per_layer'])} | "
                     f"{_mb(peaks['observer_forward'])} | {_mb(peaks['plain_backward'])} | "
                     f"{_mb(peaks['heapr_observer'])} | **{_mb(row['extra_tensor_bytes_per_layer'])}** | {rss} | "
                     f"{_mb(row['scoring_peak_bytes'])} |")
        measured = [row["extra_tensor_bytes_per_layer"], row.get("extra_rss_bytes_per_layer", 0.0),
                    row["scoring_peak_bytes"] / row["moe_layers"]]
        if max(measured) <= target * 2**20:
            within.append(row["fixture"])
    first = data["rows"][0] if data["rows"] else None
    if first:
        lines += ["", f"Observed: {first['calibration_windows']} calibration windows of {first['seq_len']} tokens "
                      f"({first['calibration_windows'] // first['domains']} per domain), batches of "
                      f"{first['batch_size']}; peaks are per batch. RSS children run with "
                      "MALLOC_MMAP_THRESHOLD_=65536 so RSS follows live memory."]
    lines += ["", "Check: HEAPr's extra memory (statistics: tensors and RSS; scoring) at most "
              f"{target:g} MiB per MoE layer on "
              f"{len(within)} of {len(data['rows'])} fixtures ({', '.join(within) or 'none'}); accumulators equal "
              "the O(E x I) bound on "
              f"{sum(r['accumulator_bytes_per_layer'] == r['bound_bytes_per_layer'] for r in data['rows'])} of "
              f"{len(data['rows'])}."]
    return lines
