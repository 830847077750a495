"""Suite ``condensing``: CD-MoE condensing against expert pruning at equal parameter count.

Condense, Don't Just Prune (Cao et al., arXiv 2412.00069): a condensed MoE layer routes every
token through the same few experts with fixed weights (their mean gate wbar_e) plus the shared
experts, y = sum_{e in S} wbar_e f_e(x) + shared(x). moecompress chooses S greedily per layer
and which layers to condense greedily by the effect on the last hidden states
(docs/methods/condensing.md, `moecompress.condense`).

Per fixture, a small grid: condense 1 layer and half of the MoE layers (rounded up), chosen by
the greedy layer search, keeping top_k / 2 and top_k experts per condensed layer. Where the
config makes only a prefix of the layers dense (DeepSeek-V3: `first_k_dense_replace`), the
same grid is also run on the FIRST MoE layers, the only choice a stock checkpoint can hold
(skipped when the greedy search chose exactly those layers). Each checkpoint is written by
`condense_checkpoint` and reopened with the loader its manifest names (`loads_with`: plain
transformers for the stock layout, moecompress's loader for its own layout).

Against each condensed model: uniform expert pruning (REAP by default) whose kept count per
layer gives the parameter count closest to the condensed checkpoint's, planned with
`plan_pruning` on the same calibration windows, written with `write_pruned` (which drops the
experts with the adapter) in the input's dtype, reloaded the same way.

Measured per model: per-domain test perplexity, parameters and safetensors bytes of the
checkpoint as written, CPU forward time per test window (batch 1, the first test window of
each domain; all models of a fixture timed round-robin, median over repeats, on the run's
thread count) and, for condensing, the search time and the whole condense call's time.
"""

from __future__ import annotations

import importlib
import math
import statistics as pystats
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from benchmarks.harness.context import Fixture
from benchmarks.harness.report import _fmt, renderer
from benchmarks.harness.suites import _domain_ppl, _windows, suite
from moecompress.prune.request import PruneRequest

DEFAULT_PRUNE_METHOD = "reap"
DEFAULT_TIMING_REPEATS = 15


@dataclass(frozen=True)
class GridPoint:
    """One condensing configuration: which layers (greedy or the first MoE layers), how many, experts kept."""

    selection: str  # "greedy" (automatic layer search) or "first" (the first MoE layers, explicit)
    num_layers: int
    experts: int
    layout: str = "auto"  # condense_checkpoint's layout argument

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return dict(self.__dict__)


def default_grid(fixture: Fixture) -> list[GridPoint]:
    """1 and half (rounded up) of the MoE layers x top_k/2 and top_k experts; 'first' too for prefix-dense configs."""
    from moecompress.condense.transformers_layout import NotExpressible, dense_slots

    adapter, config = fixture.adapter, fixture.model.config
    moe_layers = len(adapter.moe_layers(fixture.model))
    top_k = adapter.top_k(config)
    layer_counts = sorted({1, math.ceil(moe_layers / 2)})
    expert_counts = sorted({max(1, top_k // 2), top_k})
    selections = ["greedy"]
    try:
        if dense_slots(config).kind == "prefix":
            selections.append("first")
    except NotExpressible:
        pass
    return [GridPoint(s, n, k) for s in selections for n in layer_counts for k in expert_counts]


# ---------------------------------------------------------------------------------------------
# loading what moecompress wrote


def resolve_loader(loads_with: str) -> Callable[..., nn.Module]:
    """The callable named by a manifest's `loads_with` (e.g. "transformers.AutoModelForCausalLM.from_pretrained")."""
    parts = loads_with.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            target = getattr(target, attr)
        return target
    raise ValueError(f"cannot resolve loader {loads_with!r}")


def reload(folder: Path, loads_with: str) -> nn.Module:
    """Open a written checkpoint with the loader it names, in float32, eval mode."""
    loader = resolve_loader(loads_with)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if loads_with.startswith("transformers."):
        kwargs["local_files_only"] = True
    return loader(str(folder), **kwargs).eval()


def count_parameters(model: nn.Module) -> int:
    """Parameters of a model (tied ones once)."""
    return sum(p.numel() for p in model.parameters())


def safetensors_bytes(folder: Path) -> int:
    """Bytes of the weight files of a checkpoint folder."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# condensing


def condense_and_reload(fixture: Fixture, point: GridPoint, folder: Path) -> tuple[dict[str, Any], nn.Module]:
    """Condense the fixture for one grid point into `folder`, reload it, evaluate it; (row, reloaded model)."""
    from moecompress.condense.run import LOADS_WITH, CondenseRequest, condense_checkpoint

    protocol = fixture.protocol
    layers = None
    if point.selection == "first":
        layers = first_moe_layers(fixture, point.num_layers)
    started = time.perf_counter()
    request = CondenseRequest(layers=layers, experts=point.experts,
                              num_layers=None if layers is not None else point.num_layers, layout=point.layout,
                              sources=fixture.calibration_sources(), samples=protocol.calib_windows,
                              seq_len=protocol.seq_len, seed=protocol.calib_seed, batch_size=protocol.batch_size,
                              timing=False)
    result = condense_checkpoint(fixture.folder, folder, request, progress=False)
    condense_seconds = time.perf_counter() - started
    loads_with = LOADS_WITH[result.layout]
    model = reload(folder, loads_with)
    evaluation = fixture.evaluate(model)
    plan = result.plan
    row = {
        **point.as_dict(),
        "layers": sorted(plan.layers),
        "layer_order": list(plan.layers),
        "kept_experts": {str(layer): ids for layer, ids in plan.experts.items()},
        "weights": {str(layer): [round(w, 4) for w in ws] for layer, ws in plan.weights.items()},
        "written_layout": result.layout,
        "layout_note": result.layout_note,
        "loaded_with": loads_with,
        "padded_neurons": int(result.dense_info.get("padded_neurons", 0)),
        "dense_width": result.dense_info.get("width"),
        "parameters": count_parameters(model),
        "bytes_on_disk": safetensors_bytes(folder),
        "perplexity": _domain_ppl(evaluation),
        "mean_perplexity": evaluation["mean_perplexity"],
        "windows": _windows(evaluation),
        "search_seconds": plan.cost.get("total_seconds"),
        "search_cost": plan.cost,
        "condense_seconds": round(condense_seconds, 2),
        "layer_search": plan.layer_search,
    }
    return row, model


def first_moe_layers(fixture: Fixture, count: int) -> list[int]:
    """Decoder indices of the first `count` MoE layers."""
    return [ref.index for ref in fixture.adapter.moe_layers(fixture.model)][:count]


# ---------------------------------------------------------------------------------------------
# pruning at equal parameter count


def pruned_parameter_counts(fixture: Fixture, method: str, stats: Any) -> dict[int, int]:
    """Kept experts per layer -> parameters of the uniformly pruned model, for every count the router allows."""
    from moecompress.prune.run import params_after, plan_pruning, routing_shape
    from moecompress.prune.select import feasible_counts

    model, adapter = fixture.model, fixture.adapter
    before = count_parameters(model)
    shape = routing_shape(adapter, model.config)
    counts = {}
    for keep in feasible_counts(shape):
        if keep == shape.num_experts:
            continue  # nothing pruned
        plan = plan_pruning(stats, adapter, model.config,
            PruneRequest(method=method, keep=keep, protect_super_experts=False))
        counts[keep] = params_after(plan, before, adapter, model)
    return counts


def matching_keep(counts: dict[int, int], target: int) -> int:
    """The kept count whose parameter count is closest to `target` (ties: the larger model)."""
    return min(counts, key=lambda keep: (abs(counts[keep] - target), -keep))


def prune_and_reload(fixture: Fixture, method: str, keep: int, stats: Any, folder: Path
                     ) -> tuple[dict[str, Any], nn.Module]:
    """Uniform pruning to `keep` experts per layer, written by moecompress, reloaded, evaluated; (row, model)."""
    from moecompress.io.manifest import build_manifest
    from moecompress.prune.materialize import write_pruned
    from moecompress.prune.run import plan_pruning

    model, adapter = fixture.model, fixture.adapter
    started = time.perf_counter()
    plan = plan_pruning(stats, adapter, model.config, PruneRequest(method=method, keep=keep,
                                                                   protect_super_experts=False))
    manifest = build_manifest("prune", plan.method, plan.params, fixture.protocol.calib_seed, fixture.folder,
                              model.config, stats, plan=plan.model_dump(exclude={"scores"}))
    written = write_pruned(model, adapter, plan, fixture.tokenizer, folder, manifest, fixture.folder)
    prune_seconds = time.perf_counter() - started
    reloaded = reload(written.path, written.loads_with)
    evaluation = fixture.evaluate(reloaded)
    row = {
        "method": method,
        "kept_per_layer": keep,
        "num_experts": plan.num_experts,
        "keep": {str(layer): ids for layer, ids in plan.keep.items()},
        "written_layout": written.format,
        "loaded_with": written.loads_with,
        "parameters": count_parameters(reloaded),
        "bytes_on_disk": safetensors_bytes(written.path),
        "perplexity": _domain_ppl(evaluation),
        "mean_perplexity": evaluation["mean_perplexity"],
        "windows": _windows(evaluation),
        "prune_seconds": round(prune_seconds, 2),
    }
    return row, reloaded


# ---------------------------------------------------------------------------------------------
# forward time


def timing_windows(fixture: Fixture) -> torch.Tensor:
    """(D, S): the first test window of each domain."""
    from moecompress.calibration.data import read_texts, token_stream, windows

    rows = []
    for source in fixture.test_sources():
        stream = token_stream(fixture.tokenizer, read_texts(source))  # (L,)
        rows.append(windows(stream, fixture.protocol.seq_len, count=1)[0])
    return torch.stack(rows)


@torch.no_grad()
def forward_ms_per_window(models: dict[str, nn.Module], window_ids: torch.Tensor, repeats: int
                          ) -> dict[str, tuple[float, float]]:
    """Per model: (median over `repeats` of the mean forward ms of one (1, S) window, interquartile range / median).

    The models take turns (round-robin, after one warm-up each), so other load on a shared CPU
    falls on all of them alike.
    """
    def once(model: nn.Module) -> float:
        start = time.perf_counter()
        for row in window_ids:
            model(input_ids=row[None], use_cache=False)
        return (time.perf_counter() - start) * 1000 / window_ids.shape[0]

    for model in models.values():
        once(model)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            samples[name].append(once(model))
    out = {}
    for name, values in samples.items():
        median = pystats.median(values)
        quartiles = pystats.quantiles(values, n=4) if len(values) > 1 else [median, median, median]
        out[name] = (median, (quartiles[2] - quartiles[0]) / median)
    return out


# ---------------------------------------------------------------------------------------------
# the suite


def condense_fixture(fixture: Fixture, grid: list[GridPoint], method: str, repeats: int,
                     workdir: Path) -> dict[str, Any]:
    """Every grid point of one fixture with its equal-parameter pruning partner, timed together."""
    base = fixture.unpruned
    started = time.perf_counter()
    stats = fixture.stats(("count", "gated_out_norm") if method == "reap" else ("count",))
    stats_seconds = time.perf_counter() - started
    counts = pruned_parameter_counts(fixture, method, stats)
    models: dict[str, nn.Module] = {"unpruned": fixture.model}
    pruned: dict[int, dict[str, Any]] = {}
    pairs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for index, point in enumerate(tqdm(grid, desc=f"condensing {fixture.name}", unit="model")):
        if point.selection == "first":
            same = first_moe_layers(fixture, point.num_layers)
            twin = next((p for p in pairs if p["condensed"]["selection"] == "greedy"
                         and p["condensed"]["experts"] == point.experts and p["condensed"]["layers"] == same), None)
            if twin is not None:
                skipped.append({**point.as_dict(), "reason": "the greedy search chose these layers"})
                continue
        condensed, model = condense_and_reload(fixture, point, workdir / f"condensed-{index}")
        models[f"condensed-{index}"] = model
        condensed["timing_key"] = f"condensed-{index}"
        keep = matching_keep(counts, condensed["parameters"])
        if keep not in pruned:
            row, pruned_model = prune_and_reload(fixture, method, keep, stats, workdir / f"pruned-{keep}")
            row["timing_key"] = f"pruned-{keep}"
            models[row["timing_key"]] = pruned_model
            pruned[keep] = row
        pairs.append({"condensed": condensed, "pruned": pruned[keep]})
    timings = forward_ms_per_window(models, timing_windows(fixture), repeats)
    for row in [p["condensed"] for p in pairs] + list(pruned.values()):
        row["forward_ms"], row["forward_ms_spread"] = timings[row["timing_key"]]
        row["speedup"] = timings["unpruned"][0] / row["forward_ms"]
    adapter, config = fixture.adapter, fixture.model.config
    return {
        "fixture": fixture.name,
        "num_experts": adapter.num_experts(config),
        "top_k": adapter.top_k(config),
        "moe_layers": [ref.index for ref in adapter.moe_layers(fixture.model)],
        "unpruned": {"perplexity": _domain_ppl(base), "mean_perplexity": base["mean_perplexity"],
                     "parameters": base["parameters"], "bytes_on_disk": safetensors_bytes(fixture.folder),
                     "forward_ms": timings["unpruned"][0], "forward_ms_spread": timings["unpruned"][1],
                     "windows": _windows(base)},
        "prune_method": method,
        "prune_calibration_seconds": round(stats_seconds, 2),
        "pruned_parameter_counts": {str(k): v for k, v in counts.items()},
        "pairs": pairs,
        "skipped": skipped,
    }


@suite("condensing", "Condensing (CD-MoE) against expert pruning at equal parameter count")
def condensing(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Condensed models of a small grid per fixture, each against pruning at the nearest parameter count.

    options: "condense_grid" (list of GridPoint fields, for every fixture; default `default_grid`),
    "condense_prune_method" (default "reap"), "timing_repeats" (default 7).
    """
    method: str = options.get("condense_prune_method", DEFAULT_PRUNE_METHOD)
    repeats: int = options.get("timing_repeats", DEFAULT_TIMING_REPEATS)
    results = []
    for fixture in fixtures:
        grid = ([GridPoint(**point) for point in options["condense_grid"]] if options.get("condense_grid")
                else default_grid(fixture))
        with tempfile.TemporaryDirectory(prefix="moecompress-condense-") as tmp:
            results.append(condense_fixture(fixture, grid, method, repeats, Path(tmp)))
    return {"fixtures": results, "prune_method": method, "timing_repeats": repeats,
            "threads": torch.get_num_threads(), "seq_len": fixtures[0].protocol.seq_len if fixtures else None}


# ---------------------------------------------------------------------------------------------
# the report


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def _layers_cell(row: dict[str, Any]) -> str:
    layers = ", ".join(map(str, row["layers"]))
    return f"{layers} ({'greedy' if row['selection'] == 'greedy' else 'first MoE'})"


def _layout_cell(row: dict[str, Any]) -> str:
    loader = ".".join(row["loaded_with"].split(".")[-2:]) if row["loaded_with"].startswith("transformers.") \
        else row["loaded_with"].split(".")[-1]
    layout = "stock" if row["written_layout"] == "transformers" else row["written_layout"]
    text = f"{layout} (`{loader}`)"
    if row.get("padded_neurons"):
        text += f"; {row['padded_neurons']} zero-padded neurons"
    return text


@renderer("condensing")
def render_condensing(data: dict[str, Any]) -> list[str]:
    """One table per fixture (unpruned, then each condensed model followed by its pruning partner) and checks."""
    lines: list[str] = []
    method = data["prune_method"]
    for entry in data["fixtures"]:
        base = entry["unpruned"]
        domains = list(base["perplexity"])
        windows = ", ".join(f"{d} {n}" for d, n in base["windows"].items())
        lines += [
            f"### {entry['fixture']}", "",
            f"{entry['num_experts']} routed experts (top-{entry['top_k']}) in MoE layers "
            f"{', '.join(map(str, entry['moe_layers']))}; windows per domain: {windows}. Each condensed model is "
            f"followed by {method} pruning (uniform per layer) at the kept count whose parameter count is closest. "
            f"Forward: ms per {data['seq_len']}-token test window at batch 1, median of {data['timing_repeats']} "
            f"round-robin repeats on {data['threads']} thread(s) (spread, interquartile range / median: up to "
            f"{_max_spread(entry):.0%}); speed-up = unpruned time / model time. Search: "
            f"the condense search (calibration pass, expert and layer greedy); in brackets the whole condense call "
            f"(load, calibration set, search, write). {method} calibration statistics took "
            f"{entry['prune_calibration_seconds']:.1f} s; a pruned model listed twice is the same model.",
            "",
            "| model | condensed layers | experts kept / layer | layout | parameters | size | " + " | ".join(domains)
            + " | mean | x unpruned | ms / window | speed-up | search s |",
            "|---|---|---|---|---:|---:|" + "---:|" * len(domains) + "---:|---:|---:|---:|---:|",
            f"| unpruned | all MoE | {entry['num_experts']} routed (top-{entry['top_k']}) | stock | "
            f"{base['parameters'] / 1e6:.3f} M | {_size(base['bytes_on_disk'])} | "
            + " | ".join(_fmt(base["perplexity"][d]) for d in domains)
            + f" | **{_fmt(base['mean_perplexity'])}** | 1.00 | {base['forward_ms']:.1f} | 1.00 | |",
        ]
        for pair in entry["pairs"]:
            cd, pr = pair["condensed"], pair["pruned"]
            lines.append(
                f"| CD-MoE | {_layers_cell(cd)} | {cd['experts']} fixed | {_layout_cell(cd)} | "
                f"{cd['parameters'] / 1e6:.3f} M | {_size(cd['bytes_on_disk'])} | "
                + " | ".join(_fmt(cd["perplexity"][d]) for d in domains)
                + f" | **{_fmt(cd['mean_perplexity'])}** | {cd['mean_perplexity'] / base['mean_perplexity']:.2f} | "
                f"{cd['forward_ms']:.1f} | {cd['speedup']:.2f} | {cd['search_seconds']:.1f} "
                f"({cd['condense_seconds']:.1f}) |")
            lines.append(
                f"| ↳ {pr['method']} pruning | all MoE | {pr['kept_per_layer']} of {pr['num_experts']} routed | "
                f"{_layout_cell({**pr, 'padded_neurons': 0})} | {pr['parameters'] / 1e6:.3f} M | "
                f"{_size(pr['bytes_on_disk'])} | "
                + " | ".join(_fmt(pr["perplexity"][d]) for d in domains)
                + f" | **{_fmt(pr['mean_perplexity'])}** | {pr['mean_perplexity'] / base['mean_perplexity']:.2f} | "
                f"{pr['forward_ms']:.1f} | {pr['speedup']:.2f} | |")
        lines += [""] + _checks(entry, method) + [""]
        for item in entry.get("skipped", []):
            lines.append(f"- not run: first {item['num_layers']} MoE layer(s), {item['experts']} experts "
                         f"({item['reason']})")
        if entry.get("skipped"):
            lines.append("")
    return lines


def _checks(entry: dict[str, Any], method: str) -> list[str]:
    """Parameter match, perplexity and speed of each condensed model against its pruning partner."""
    pairs = entry["pairs"]
    if not pairs:
        return ["Check: no condensed model."]
    counts = "; ".join(
        f"{_pair_name(p['condensed'])}: {p['condensed']['parameters']:,} vs {p['pruned']['parameters']:,} "
        f"({(p['pruned']['parameters'] - p['condensed']['parameters']) / p['condensed']['parameters']:+.1%})"
        for p in pairs)
    ppl_wins = [p for p in pairs if p["condensed"]["mean_perplexity"] < p["pruned"]["mean_perplexity"]]
    speed_wins = [p for p in pairs if p["condensed"]["forward_ms"] < p["pruned"]["forward_ms"]]
    faster = [p for p in pairs if p["condensed"]["speedup"] > 1.0]
    ppl_ratios = ", ".join(f"{p['condensed']['mean_perplexity'] / p['pruned']['mean_perplexity']:.2f}" for p in pairs)
    time_ratios = ", ".join(f"{p['condensed']['forward_ms'] / p['pruned']['forward_ms']:.2f}" for p in pairs)
    speedups = ", ".join(f"{p['condensed']['speedup']:.2f}x" for p in pairs)
    return [
        f"Parameters, condensed vs {method} pruning (pruned relative to condensed): {counts}.",
        "",
        f"Check: at (nearly) equal parameters, condensing has the lower mean perplexity in {len(ppl_wins)} of "
        f"{len(pairs)} pairs (condensed / pruned mean perplexity, in table order: {ppl_ratios}) and the shorter "
        f"forward time in {len(speed_wins)} of {len(pairs)} (condensed / pruned time: {time_ratios}); condensed "
        f"models are faster than unpruned in {len(faster)} of {len(pairs)} (speed-ups {speedups}).",
    ]


def _max_spread(entry: dict[str, Any]) -> float:
    rows = [entry["unpruned"]] + [row for pair in entry["pairs"] for row in pair.values()]
    return max(row.get("forward_ms_spread", 0.0) for row in rows)


def _pair_name(row: dict[str, Any]) -> str:
    return f"layers {','.join(map(str, row['layers']))} x {row['experts']}"
