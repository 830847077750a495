"""Expert merging against dropping: `prune --merge none|centroid|cluster` for every statistics-only scorer.

``expert-merging``: every statistics-only expert scorer (random excluded: its draw ignores the
data) at 25/50/75% of routed experts removed, uniform per layer, one-pass scoring, super-expert
protection off, with the removed experts dropped (``none``), folded into their nearest kept
expert (``centroid``, M-SMoE style) or with all experts clustered by average output and one
merged expert kept per cluster (``cluster``, HC-SMoE; the method only names each cluster's
representative, whose router row the merged expert keeps). Each run is the product's own
`prune_checkpoint` end to end into a folder, reopened with plain
`AutoModelForCausalLM.from_pretrained` and evaluated on the test windows. Every run reuses the
fixture's calibration statistics on the validation windows, mean_output included
(`Fixture.stats`). Time: `prune_checkpoint`'s wall clock (no calibration in it).

Checks: per fixture and merge mode, in how many (method, ratio) pairs merging gives a lower
mean perplexity than dropping; and the best row at 50% against frequency with dropping (the
default-method target of the defaults issue: an increase at most half of frequency's).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmarks.harness.context import Fixture
from benchmarks.harness.report import _fmt, renderer
from benchmarks.harness.scoring_order import sequential_methods
from benchmarks.harness.suites import _domain_ppl, _windows, best_and_share, feasible_pairs, rows_by_fixture, suite
from moecompress.prune.request import PruneRequest

RATIOS = (0.25, 0.5, 0.75)
MERGES = ("none", "centroid", "cluster")
TARGET_RATIO = 0.5
TARGET_SHARE = 0.5


def shared_statistics(methods: list[str]) -> tuple[str, ...]:
    """Every statistic the methods and merging read: one calibration per fixture serves every run."""
    from moecompress.prune.run import required_statistics

    return tuple(sorted({name for method in methods for name in required_statistics(method, False, merge="cluster")}))


def _run(fixture: Fixture, method: str, ratio: float, merge: str, statistics: tuple[str, ...]) -> dict[str, Any]:
    """`prune_checkpoint` into a temporary folder, reopened with transformers and evaluated."""
    import torch
    from transformers import AutoModelForCausalLM

    from moecompress.prune.run import prune_checkpoint

    protocol = fixture.protocol
    stats = fixture.stats(statistics)
    with tempfile.TemporaryDirectory(prefix="moecompress-bench-") as tmp:
        output = Path(tmp) / "pruned"
        started = time.perf_counter()
        request = PruneRequest(method=method, ratio=ratio, sources=fixture.calibration_sources(),
                               samples=protocol.calib_windows, seq_len=protocol.seq_len, seed=protocol.calib_seed,
                               batch_size=protocol.batch_size, protect_super_experts=False, merge=merge)
        done = prune_checkpoint(fixture.folder, output, request, stats=stats, progress=False)
        seconds = time.perf_counter() - started
        model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32, local_files_only=True).eval()
        result = fixture.evaluate(model)
    base = fixture.unpruned["mean_perplexity"]
    groups = [len(members) for per in done.plan.merged.values() for members in per]
    return {"method": method, "ratio": ratio, "merge": merge, "perplexity": _domain_ppl(result),
            "mean_perplexity": result["mean_perplexity"], "x_unpruned": result["mean_perplexity"] / base,
            "kept_per_layer": len(next(iter(done.plan.keep.values()))), "keep": done.plan.keep,
            "largest_group": max(groups) if groups else 1, "seconds": seconds}


@suite("expert-merging", "Expert merging: dropping against centroid and cluster merging")
def expert_merging(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Method x ratio x merge mode on every fixture."""
    ratios = options.get("ratios", RATIOS)
    methods = options.get("methods") or sequential_methods()
    pairs, skipped = feasible_pairs(fixtures, ratios)
    statistics = shared_statistics(list(methods))
    jobs = [(fixture, method, ratio, merge) for fixture, ratio in pairs for method in methods for merge in MERGES]
    rows = []
    bar = tqdm(jobs, desc="expert merging", unit="run")
    for fixture, method, ratio, merge in bar:
        bar.set_postfix_str(f"{fixture.name} {ratio:.0%} {method} {merge}")
        rows.append({"fixture": fixture.name, "windows": _windows(fixture.unpruned),
                     **_run(fixture, method, ratio, merge, statistics)})
    infos = [{"fixture": f.name, "perplexity": _domain_ppl(f.unpruned), "mean_perplexity": f.unpruned["mean_perplexity"],
              "windows": _windows(f.unpruned)} for f in fixtures]
    return {"rows": rows, "fixtures": infos, "ratios": list(ratios), "methods": list(methods), "merges": list(MERGES),
            "target_ratio": TARGET_RATIO, "target_share": TARGET_SHARE, "skipped": skipped}


def _find(rows: list[dict[str, Any]], method: str, ratio: float, merge: str) -> dict[str, Any] | None:
    return next((row for row in rows if row["method"] == method and row["ratio"] == ratio and row["merge"] == merge),
                None)


def merging_checks(data: dict[str, Any], fixture: str) -> dict[str, Any]:
    """Per merge mode, how often it beats dropping; the best row at the target ratio and its share of frequency's rise."""
    rows = [row for row in data["rows"] if row["fixture"] == fixture]
    unpruned = next(info for info in data["fixtures"] if info["fixture"] == fixture)["mean_perplexity"]
    pairs = sorted({(row["method"], row["ratio"]) for row in rows})
    wins: dict[str, dict[str, int]] = {}
    for merge in data["merges"]:
        if merge == "none":
            continue
        won = compared = 0
        for method, ratio in pairs:
            drop, merged = _find(rows, method, ratio, "none"), _find(rows, method, ratio, merge)
            if drop and merged:
                compared += 1
                won += merged["mean_perplexity"] < drop["mean_perplexity"]
        wins[merge] = {"wins": won, "compared": compared}
    ratio = data["target_ratio"]
    at = [row for row in rows if row["ratio"] == ratio]
    best, share = best_and_share(at, _find(rows, "frequency", ratio, "none"), unpruned)
    return {"wins": wins, "best": best, "share": share}


@renderer("expert-merging")
def render_expert_merging(data: dict[str, Any]) -> list[str]:
    """Per fixture: mean perplexity per method for each (ratio, merge mode), then the checks."""
    lines: list[str] = []
    columns = [(ratio, merge) for ratio in data["ratios"] for merge in data["merges"]]
    for info, rows in rows_by_fixture(data):
        fixture = info["fixture"]
        present = [c for c in columns if any(_find(rows, m, *c) for m in data["methods"])]
        lines += [f"### {fixture}", "",
                  f"Unpruned mean perplexity {_fmt(info['mean_perplexity'])}; windows per domain: "
                  f"{', '.join(f'{d} {n}' for d, n in info['windows'].items())}. Mean test perplexity (lower is "
                  "better); the lowest of the three modes at each ratio in bold.", "",
                  "| method | " + " | ".join(f"{ratio:.0%} {merge}" for ratio, merge in present) + " |",
                  "|---|" + "---:|" * len(present)]
        for method in data["methods"]:
            cells = []
            for ratio, merge in present:
                row = _find(rows, method, ratio, merge)
                if row is None:
                    cells.append("-")
                    continue
                others = [_find(rows, method, ratio, m) for m in data["merges"]]
                lowest = min(o["mean_perplexity"] for o in others if o is not None)
                text = _fmt(row["mean_perplexity"])
                cells.append(f"**{text}**" if row["mean_perplexity"] == lowest else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        check = merging_checks(data, fixture)
        best = check["best"]
        share = ("undefined" if check["share"] is None else
                 f"{check['share']:.2f} (target at most {data['target_share']:.2f}: "
                 f"{'met' if check['share'] <= data['target_share'] else 'not met'})")
        lines += ["", "Check: " + "; ".join(f"{merge} merging lowers mean perplexity against dropping in {n['wins']} of "
                                            f"{n['compared']} (method, ratio) pairs"
                                            for merge, n in check["wins"].items())
                  + f"; best at {data['target_ratio']:.0%}: "
                  + (f"{best['method']}, merge {best['merge']} {_fmt(best['mean_perplexity'])}" if best else "none")
                  + f", its increase over unpruned as a share of frequency's (dropping): {share}.", ""]
    seconds = [row["seconds"] for row in data["rows"]]
    if seconds:
        by = {m: [row["seconds"] for row in data["rows"] if row["merge"] == m] for m in data["merges"]}
        lines.append("Time per run (`prune_checkpoint` from reused statistics, writing included): "
                     + "; ".join(f"{m} mean {sum(v) / len(v):.1f} s" for m, v in by.items() if v) + ".")
    for item in data.get("skipped", []):
        lines.append(f"- {item['fixture']} at {item['ratio']:.0%}: not run ({item['reason']})")
    return lines
