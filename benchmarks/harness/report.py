"""Raw JSON per suite, and RESULTS.md rendered from every stored suite result.

Each suite run writes `benchmarks/results/<suite>.json` (environment, protocol, fixtures,
rows). RESULTS.md is always rendered from all stored JSON files, so running one suite
refreshes its section and keeps the others.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
RESULTS_MD = Path(__file__).resolve().parents[1] / "RESULTS.md"
SUITE_ORDER = (
    "unpruned", "pruning-baselines", "domain-pruning",  # fixtures and baselines
    "pruning-methods", "scoring-order", "expert-merging", "domain-methods", "heapr-memory",  # pruning methods
    "quantisation",  # mixed-precision quantisation
    "condensing",  # CD-MoE
    "observer-overhead", "calibration-memory", "lp-solve-time",  # costs of the machinery
)


def environment() -> dict[str, Any]:
    """Machine, library versions, date and git commit of a run."""
    import tokenizers
    import torch
    import transformers

    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=repo, timeout=10).stdout.strip() or None
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=repo, timeout=10).stdout.strip()
        if commit and changed:
            commit += " + uncommitted changes"
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "git_commit": commit,
    }


def save_suite(name: str, payload: dict[str, Any], folder: Path = RESULTS_DIR) -> Path:
    """Write one suite's raw JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def load_suites(folder: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """Every stored suite result by name."""
    if not folder.is_dir():
        return {}
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def _fmt(value: float) -> str:
    return f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"


def _domains(rows: list[dict[str, Any]]) -> list[str]:
    return list(rows[0]["perplexity"]) if rows else []


def _window_note(rows: list[dict[str, Any]]) -> str:
    windows = rows[0].get("windows", {}) if rows else {}
    return ", ".join(f"{d} {n}" for d, n in windows.items())


def render_unpruned(data: dict[str, Any]) -> list[str]:
    """Table: one row per fixture."""
    rows = data["rows"]
    domains = _domains(rows)
    lines = ["| fixture | routed experts (top-k) | parameters | training | " + " | ".join(domains) + " | mean | windows |",
             "|---|---|---:|---:|" + "---:|" * len(domains) + "---:|---|"]
    for row in rows:
        ppl = " | ".join(_fmt(row["perplexity"][d]) for d in domains)
        windows = ", ".join(str(row["windows"][d]) for d in domains)
        name = row["fixture"] if row["fixture"] == row["model_type"] else f"{row['fixture']} ({row['model_type']})"
        lines.append(f"| {name} | {row['num_experts']} (top-{row['top_k']}) | "
                     f"{row['parameters'] / 1e6:.2f} M | {row['training_steps']} steps, {row['training_minutes']} min | "
                     f"{ppl} | **{_fmt(row['mean_perplexity'])}** | {windows} |")
    return lines


def render_baselines(data: dict[str, Any]) -> list[str]:
    """One table per fixture: method x ratio, plus the frequency/random check at each ratio."""
    lines: list[str] = []
    by_fixture: dict[str, list[dict[str, Any]]] = {}
    for row in data["rows"]:
        by_fixture.setdefault(row["fixture"], []).append(row)
    for fixture, rows in by_fixture.items():
        domains = _domains(rows)
        lines += [f"### {fixture}", "",
                  f"Unpruned mean perplexity {_fmt(rows[0]['unpruned_mean'])}; windows per domain: {_window_note(rows)}. "
                  "Random: per-domain means over seeds; ± is the standard deviation of the mean perplexity over seeds.",
                  "",
                  "| removed | kept / layer | method | " + " | ".join(domains) + " | mean | x unpruned |",
                  "|---:|---:|---|" + "---:|" * len(domains) + "---:|---:|"]
        for row in rows:
            ppl = " | ".join(_fmt(row["perplexity"][d]) for d in domains)
            spread = f" ± {_fmt(row['mean_perplexity_std'])}" if row.get("mean_perplexity_std") else ""
            lines.append(f"| {row['ratio']:.0%} | {row['kept_per_layer']} | {row['method']} | {ppl} | "
                         f"**{_fmt(row['mean_perplexity'])}**{spread} | {row['mean_perplexity'] / row['unpruned_mean']:.2f} |")
        checks = []
        for ratio in sorted({row["ratio"] for row in rows}):
            pair = {row["method"].split()[0]: row for row in rows if row["ratio"] == ratio}
            if "random" in pair and "frequency" in pair:
                checks.append(f"{ratio:.0%}: frequency / random mean perplexity = "
                              f"{pair['frequency']['mean_perplexity'] / pair['random']['mean_perplexity']:.2f}")
        lines += ["", "Check: " + "; ".join(checks) + " (below 1: frequency keeps more quality than random).", ""]
    for item in data.get("skipped", []):
        lines.append(f"- {item['fixture']} at {item['ratio']:.0%}: not run ({item['reason']})")
    return lines


def domain_matrix(rows: list[dict[str, Any]], method: str) -> list[str]:
    """Intro line and table of a domain-calibration block: one row per calibration domain, one
    column per evaluated domain, cells perplexity (x unpruned), the best calibration per column
    in bold. `rows` carry calibrated_on, perplexity, unpruned, mean_perplexity, ratio, kept_per_layer."""
    domains = _domains(rows)
    base = rows[0]["unpruned"]
    lines = [f"{method}, {rows[0]['ratio']:.0%} of routed experts removed ({rows[0]['kept_per_layer']} kept per "
             f"layer); windows per domain: {_window_note(rows)}. Cells: perplexity (x unpruned); best calibration "
             "per evaluated domain in bold.", "",
             "| calibrated on | " + " | ".join(f"eval {d}" for d in domains) + " | mean |",
             "|---|" + "---:|" * len(domains) + "---:|",
             "| (unpruned) | " + " | ".join(_fmt(base[d]) for d in domains) + " | "
             + _fmt(sum(base.values()) / len(base)) + " |"]
    best = {d: min(rows, key=lambda r: r["perplexity"][d])["calibrated_on"] for d in domains}
    for row in rows:
        cells = []
        for d in domains:
            text = f"{_fmt(row['perplexity'][d])} ({row['perplexity'][d] / base[d]:.2f}x)"
            cells.append(f"**{text}**" if best[d] == row["calibrated_on"] else text)
        lines.append(f"| {row['calibrated_on']} | " + " | ".join(cells) + f" | {_fmt(row['mean_perplexity'])} |")
    return lines


def render_domain(data: dict[str, Any]) -> list[str]:
    """One table per fixture: calibration domain x evaluation domain, with both domain checks.

    Column check: for each evaluated domain, calibrating on that domain beats calibrating on
    another single domain. Row check: calibrating on a domain raises that domain's perplexity
    (relative to unpruned) less than it raises the other domains'.
    """
    lines: list[str] = []
    by_fixture: dict[str, list[dict[str, Any]]] = {}
    for row in data["rows"]:
        by_fixture.setdefault(row["fixture"], []).append(row)
    for fixture, rows in by_fixture.items():
        domains = _domains(rows)
        base = rows[0]["unpruned"]
        lines += [f"### {fixture}", ""] + domain_matrix(rows, "Frequency pruning")
        single = {row["calibrated_on"]: row for row in rows if row["calibrated_on"] in domains}
        column = [d for d in single if single[d]["perplexity"][d] <= min(single[o]["perplexity"][d] for o in single)]
        row_wins = []
        for d, row in single.items():
            rise = {e: row["perplexity"][e] / base[e] for e in domains}
            if rise[d] <= min(rise.values()):
                row_wins.append(d)
        lines += ["",
                  f"Checks: calibrating on a domain gives that domain the lowest perplexity among single-domain "
                  f"calibrations for {len(column)} of {len(single)} domains ({', '.join(column) or 'none'}); "
                  f"calibrating on a domain raises its own perplexity least (relative to unpruned) for "
                  f"{len(row_wins)} of {len(single)} domains ({', '.join(row_wins) or 'none'}).", ""]
    return lines


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "unpruned": render_unpruned,
    "pruning-baselines": render_baselines,
    "domain-pruning": render_domain,
}


def renderer(name: str) -> Callable[[Callable[[dict[str, Any]], list[str]]], Callable[[dict[str, Any]], list[str]]]:
    """Register the Markdown renderer of suite `name` (used by the suite modules)."""

    def wrap(fn: Callable[[dict[str, Any]], list[str]]) -> Callable[[dict[str, Any]], list[str]]:
        RENDERERS[name] = fn
        return fn

    return wrap


def render_results(suites: dict[str, dict[str, Any]]) -> str:
    """RESULTS.md from every stored suite."""
    lines = [
        "# moecompress benchmark results",
        "",
        "Generated by `python -m benchmarks.run` from the raw JSON in `benchmarks/results/`; do not edit by hand.",
        "Fixtures are small MoE models trained on this project's multi-domain corpus "
        "(`python -m benchmarks.fixtures.build`). Perplexity: test split, first N non-overlapping windows per "
        "domain (window counts in each table), mean = unweighted mean over domains. Every pruned model is saved "
        "and reloaded with plain `AutoModelForCausalLM.from_pretrained` before evaluation.",
        "",
    ]
    ordered = [name for name in SUITE_ORDER if name in suites] + sorted(set(suites) - set(SUITE_ORDER))
    for name in ordered:
        payload = suites[name]
        env = payload["environment"]
        protocol = payload["protocol"]
        lines += [
            f"## {payload['title']}",
            "",
            f"Run {env['date']} on {env['machine']} (torch {env['torch']}, {env['torch_threads']} thread(s), "
            f"transformers {env['transformers']}, commit {env['git_commit']}) in {payload['seconds'] / 60:.1f} min. "
            f"Protocol: windows of {protocol['seq_len']} tokens, up to {protocol['windows']} test windows per domain; "
            f"calibration {protocol['calib_windows']} validation windows per domain (seed {protocol['calib_seed']}). "
            f"Raw data: `benchmarks/results/{name}.json`.",
            "",
        ]
        renderer = RENDERERS.get(name)
        lines += renderer(payload["data"]) if renderer else ["(no renderer for this suite; see the JSON)"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_results(folder: Path = RESULTS_DIR, target: Path = RESULTS_MD) -> Path:
    """Render RESULTS.md from the stored JSON."""
    from benchmarks.harness.suites import load_suite_modules

    load_suite_modules()  # registers the renderers of the suites that live in their own modules
    target.write_text(render_results(load_suites(folder)))
    return target
