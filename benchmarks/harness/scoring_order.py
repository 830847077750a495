"""Scoring order and super-expert protection: one-pass against sequential scoring, protection off and on.

``scoring-order``: every statistics-only expert scorer that sequential scoring serves (random
excluded: its draw does not depend on the data) at 25/50/75% of routed experts removed,
uniform per layer, scored one-pass (every layer on the unpruned model) and sequentially
(`moecompress.prune.sequential`: layer L on the outputs of the already-pruned layers 0..L-1),
with super-expert protection off everywhere and, at 50%, also on: with moecompress's detection
(one-pass and sequential) and with the paper's rule alone (one-pass; `detection_rule`). Each run is the product's
own `prune_checkpoint` end to end into a folder, reopened with plain
`AutoModelForCausalLM.from_pretrained` and evaluated on the test windows. One-pass runs reuse
the fixture's calibration statistics (`Fixture.stats`, the same validation windows), and so do
sequential runs with protection for their super experts; a sequential run calibrates itself
(its pass is the scoring). Time: `prune_checkpoint`'s wall clock (one-pass: no calibration in
it; sequential: its pass included).

Checks: per fixture, for how many (method, ratio) pairs sequential scoring gives the lower
mean perplexity; at 50%, per detection rule, in how many runs protection changes the kept
experts and in how many of those it lowers perplexity; and the best row at 50% against
one-pass frequency without protection (the default-method target of the defaults issue: an
increase at most half of frequency's).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmarks.harness.context import Fixture
from benchmarks.harness.report import _fmt, renderer
from benchmarks.harness.suites import _domain_ppl, _windows, best_and_share, feasible_pairs, rows_by_fixture, suite

RATIOS = (0.25, 0.5, 0.75)
PROTECTION_RATIO = 0.5  # protection on is measured at this ratio only
SCORINGS = ("one-pass", "sequential")
TARGET_SHARE = 0.5
# protection rules: moecompress's detection, and the paper's alone (its two conditions, without the outlier factor)
RULES = ("moecompress", "paper")
# the runs with protection on: (scoring, rule)
PROTECTED_RUNS = (("one-pass", "moecompress"), ("sequential", "moecompress"), ("one-pass", "paper"))


@contextlib.contextmanager
def detection_rule(rule: str) -> Iterator[None]:
    """Super experts found with `rule`: "paper" sets the outlier factor to 0 (the paper's two conditions alone)."""
    from moecompress.prune import super_experts

    saved = super_experts.OUTLIER_FACTOR
    if rule == "paper":
        super_experts.OUTLIER_FACTOR = 0.0
    try:
        yield
    finally:
        super_experts.OUTLIER_FACTOR = saved


def sequential_methods() -> list[str]:
    """Statistics-only expert scorers with default parameters, frequency first (random excluded)."""
    from moecompress.prune.scorers import available_scorers

    names = [name for name, scorer in available_scorers().items()
             if scorer.granularity == "expert" and not scorer.uses_model(None) and name != "random"]
    return sorted(names, key=lambda name: (name != "frequency", name))


def _run(fixture: Fixture, method: str, ratio: float, scoring: str, protect: bool,
         rule: str = "moecompress") -> dict[str, Any]:
    """`prune_checkpoint` into a temporary folder, reopened with transformers and evaluated."""
    import torch
    from transformers import AutoModelForCausalLM

    from moecompress.prune.run import prune_checkpoint, required_statistics
    from moecompress.prune.request import PruneRequest

    protocol = fixture.protocol
    if scoring == "one-pass":
        stats = fixture.stats(tuple(required_statistics(method, protect)))
    else:
        stats = fixture.stats(("count", "max_act")) if protect else None
    with tempfile.TemporaryDirectory(prefix="moecompress-bench-") as tmp:
        output = Path(tmp) / "pruned"
        started = time.perf_counter()
        with detection_rule(rule):
                request = PruneRequest(method=method, ratio=ratio, sources=fixture.calibration_sources(),
                                       samples=protocol.calib_windows, seq_len=protocol.seq_len,
                                       seed=protocol.calib_seed, batch_size=protocol.batch_size,
                                       protect_super_experts=protect, scoring=scoring)
                done = prune_checkpoint(fixture.folder, output, request, stats=stats, progress=False)
        seconds = time.perf_counter() - started
        model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32, local_files_only=True).eval()
        result = fixture.evaluate(model)
    base = fixture.unpruned["mean_perplexity"]
    return {"method": method, "ratio": ratio, "scoring": scoring, "protect": protect, "rule": rule if protect else None,
            "perplexity": _domain_ppl(result), "mean_perplexity": result["mean_perplexity"],
            "x_unpruned": result["mean_perplexity"] / base, "kept_per_layer": len(next(iter(done.plan.keep.values()))),
            "protected": sum(len(ids) for ids in done.plan.protected.values()), "keep": done.plan.keep,
            "seconds": seconds}


@suite("scoring-order", "Scoring order and super-expert protection: one-pass against sequential scoring")
def scoring_order(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Method x ratio x scoring (x protection at 50%) on every fixture."""
    ratios = options.get("ratios", RATIOS)
    methods = options.get("methods") or sequential_methods()
    pairs, skipped = feasible_pairs(fixtures, ratios)
    jobs = [(fixture, method, ratio, scoring, False, None) for fixture, ratio in pairs for method in methods
            for scoring in SCORINGS]
    jobs += [(fixture, method, ratio, scoring, True, rule) for fixture, ratio in pairs if ratio == PROTECTION_RATIO
             for method in methods for scoring, rule in PROTECTED_RUNS]
    rows = []
    bar = tqdm(jobs, desc="scoring order", unit="run")
    for fixture, method, ratio, scoring, protect, rule in bar:
        bar.set_postfix_str(f"{fixture.name} {ratio:.0%} {method} {scoring}{f' protected ({rule})' if protect else ''}")
        rows.append({"fixture": fixture.name, "windows": _windows(fixture.unpruned),
                     **_run(fixture, method, ratio, scoring, protect, rule or "moecompress")})
    infos = [{"fixture": f.name, "perplexity": _domain_ppl(f.unpruned), "mean_perplexity": f.unpruned["mean_perplexity"],
              "windows": _windows(f.unpruned)} for f in fixtures]
    return {"rows": rows, "fixtures": infos, "ratios": list(ratios), "methods": list(methods),
            "protection_ratio": PROTECTION_RATIO, "target_share": TARGET_SHARE, "skipped": skipped}


def _find(rows: list[dict[str, Any]], method: str, ratio: float, scoring: str, protect: bool,
          rule: str | None = None) -> dict[str, Any] | None:
    """The row of one run; protected rows by detection rule (default moecompress's)."""
    want = (rule or "moecompress") if protect else None
    return next((row for row in rows if row["method"] == method and row["ratio"] == ratio
                 and row["scoring"] == scoring and row["protect"] == protect and row["rule"] == want), None)


def order_checks(data: dict[str, Any], fixture: str) -> dict[str, Any]:
    """Sequential wins, protection's effect at 50%, and the best 50% row's share of frequency's increase."""
    rows = [row for row in data["rows"] if row["fixture"] == fixture]
    unpruned = next(info for info in data["fixtures"] if info["fixture"] == fixture)["mean_perplexity"]
    pairs = sorted({(row["method"], row["ratio"]) for row in rows})
    wins, compared = 0, 0
    for method, ratio in pairs:
        one, seq = _find(rows, method, ratio, "one-pass", False), _find(rows, method, ratio, "sequential", False)
        if one and seq:
            compared += 1
            wins += seq["mean_perplexity"] < one["mean_perplexity"]
    ratio = data["protection_ratio"]
    protection: dict[str, dict[str, int]] = {}  # rule -> runs where protection changed the kept experts, and helped
    for rule in RULES:
        changes = helps = 0
        for method in {row["method"] for row in rows}:
            for scoring in SCORINGS:
                off, on = _find(rows, method, ratio, scoring, False), _find(rows, method, ratio, scoring, True, rule)
                if off and on and on["keep"] != off["keep"]:
                    changes += 1
                    helps += on["mean_perplexity"] < off["mean_perplexity"]
        if any(row["rule"] == rule for row in rows):
            protection[rule] = {"changes": changes, "helps": helps}
    at = [row for row in rows if row["ratio"] == ratio]
    best, share = best_and_share(at, _find(rows, "frequency", ratio, "one-pass", False), unpruned)
    return {"sequential_wins": wins, "compared": compared, "protection": protection, "best": best, "share": share}


def _label(row: dict[str, Any]) -> str:
    protected = f", protected ({row['rule']} rule)" if row["protect"] else ""
    return f"{row['method']}, {row['scoring']}{protected}"


def _column(ratio: float, scoring: str, protect: bool, rule: str | None) -> str:
    return f"{ratio:.0%} {scoring}" + (f" +protect ({rule} rule)" if protect else "")


@renderer("scoring-order")
def render_scoring_order(data: dict[str, Any]) -> list[str]:
    """Per fixture: mean perplexity per method and ratio for each (scoring, protection), then the checks."""
    lines: list[str] = []
    ratio_p = data["protection_ratio"]
    columns: list[tuple[float, str, bool, str | None]] = [(ratio, scoring, False, None) for ratio in data["ratios"]
                                                          for scoring in SCORINGS]
    columns += [(ratio_p, scoring, True, rule) for rule in RULES for scoring in SCORINGS]
    for info, rows in rows_by_fixture(data):
        fixture = info["fixture"]
        present = [c for c in columns if any(_find(rows, m, *c) for m in data["methods"])]
        header = " | ".join(_column(*c) for c in present)
        lines += [f"### {fixture}", "",
                  f"Unpruned mean perplexity {_fmt(info['mean_perplexity'])}; windows per domain: "
                  f"{', '.join(f'{d} {n}' for d, n in info['windows'].items())}. Mean test perplexity (lower is "
                  "better); the lower of one-pass and sequential at each ratio in bold.", "",
                  f"| method | {header} |", "|---|" + "---:|" * len(present)]
        for method in data["methods"]:
            cells = []
            for ratio, scoring, protect, rule in present:
                row = _find(rows, method, ratio, scoring, protect, rule)
                other = _find(rows, method, ratio, SCORINGS[1 - SCORINGS.index(scoring)], protect, rule)
                if row is None:
                    cells.append("-")
                    continue
                text = _fmt(row["mean_perplexity"])
                if protect:
                    text += f" ({row['protected']} protected)"
                better = other is not None and row["mean_perplexity"] < other["mean_perplexity"]
                cells.append(f"**{text}**" if better else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        check = order_checks(data, fixture)
        best = check["best"]
        share = ("undefined" if check["share"] is None else
                 f"{check['share']:.2f} (target at most {data['target_share']:.2f}: "
                 f"{'met' if check['share'] <= data['target_share'] else 'not met'})")
        lines += ["", f"Check: sequential scoring lowers mean perplexity in {check['sequential_wins']} of "
                  f"{check['compared']} (method, ratio) pairs; at {ratio_p:.0%} "
                  + "; ".join(f"protection with the {rule} rule changes the kept experts in {n['changes']} runs and "
                              f"lowers perplexity in {n['helps']} of them" for rule, n in check["protection"].items())
                  + f"; best at {ratio_p:.0%}: {_label(best) if best else 'none'}"
                  f"{' ' + _fmt(best['mean_perplexity']) if best else ''}, its increase over unpruned as a share "
                  f"of one-pass frequency's: {share}.", ""]
    seconds = [row["seconds"] for row in data["rows"]]
    if seconds:
        by = {s: [row["seconds"] for row in data["rows"] if row["scoring"] == s] for s in SCORINGS}
        lines.append("Time per run (`prune_checkpoint`, writing included): "
                     + "; ".join(f"{s} mean {sum(v) / len(v):.1f} s" for s, v in by.items() if v)
                     + " (one-pass runs reuse calibrated statistics; a sequential run's calibration pass is its "
                       "scoring).")
    for item in data.get("skipped", []):
        lines.append(f"- {item['fixture']} at {item['ratio']:.0%}: not run ({item['reason']})")
    return lines
