"""`moecompress prune`: remove routed experts (or expert neurons) and write a smaller checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from moecompress.cli.app import app
from moecompress.cli.options import (
    BatchSizeOption,
    DataOption,
    DeviceOption,
    DtypeOption,
    FieldOption,
    ForceOption,
    MaxMemoryOption,
    ModelArg,
    PrintStepOption,
    ResumeOption,
    SamplesOption,
    SeedOption,
    SeqLenOption,
)
from moecompress.errors import MoecompressError
from moecompress.prune.params import parse_key_value
from moecompress.prune.scorer_names import DEFAULT_PRUNE_METHOD


def parse_params(values: list[str] | None) -> dict[str, Any]:
    """--param key=value pairs; values parsed as JSON when they are valid JSON, else kept as text."""
    out: dict[str, Any] = {}
    for item in values or []:
        try:
            key, value = parse_key_value(item)
        except ValueError:
            raise MoecompressError(f"--param {item!r} must look like key=value") from None
        out[key] = value
    return out


@app.command("prune")
def prune_command(
    model: ModelArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for the pruned checkpoint.",
                                                show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="Scoring method: frequency, soft_count, reap, ean, "
                                        "ean_sum, weighted_ean_sum, easy_ep, premoe, naee, random (experts) or heapr (neurons); see "
                                        "docs/methods.")] = DEFAULT_PRUNE_METHOD,
    ratio: Annotated[float | None, typer.Option("--ratio", help="Fraction of routed experts (heapr: of routed-expert "
                                                "neurons) to remove.", show_default=False)] = None,
    keep: Annotated[int | None, typer.Option("--keep", help="Routed experts to keep per layer (instead of --ratio).",
                                             show_default=False)] = None,
    allocation: Annotated[str | None, typer.Option(
        "--allocation", help="uniform: same count per layer / same width per expert (loads in transformers); global: "
        "one threshold across layers (needs moecompress.load). Default: uniform for expert methods, global for "
        "heapr.", show_default=False)] = None,
    scoring: Annotated[str, typer.Option(
        "--scoring", help="one-pass: score every layer on the unpruned model; sequential: score and prune each "
        "layer on the outputs of the already-pruned layers before it (every MoE layer runs twice; statistics-only "
        "expert methods, uniform allocation).")] = "one-pass",
    merge: Annotated[str, typer.Option(
        "--merge", help="none: drop the removed experts; centroid: fold each removed expert into the kept expert "
        "whose average output is nearest (M-SMoE); cluster: group all experts by average output (HC-SMoE) and keep "
        "one merged expert per group, the method naming its representative. Merged weights are frequency-weighted "
        "averages; calibration then runs every expert on every token.")] = "none",
    param: Annotated[list[str] | None, typer.Option("--param", help="Method parameter key=value (repeatable), e.g. "
                                                    "--param top_k=2 for premoe.", show_default=False)] = None,
    domain: Annotated[str | None, typer.Option("--domain", help="Score on this calibration domain only "
                                               "(domain-specific pruning).", show_default=False)] = None,
    stats: Annotated[Path | None, typer.Option("--stats", help="Reuse statistics from `moecompress calibrate`.",
                                               show_default=False)] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Also write this experts-per-token value into the "
                                              "config.", show_default=False)] = None,
    dynamic_skip: Annotated[bool, typer.Option("--dynamic-skip", help="NAEE dynamic skipping (top-2 routers): store a "
                                               "per-layer threshold that moecompress.load applies.")] = False,
    patterns: Annotated[Path | None, typer.Option("--patterns", help="premoe: also write one expert pattern per "
                                                  "calibration domain to this JSON file (for `route-task`).",
                                                  show_default=False)] = None,
    data: DataOption = None,
    field: FieldOption = "text",
    samples: SamplesOption = 32,
    seq_len: SeqLenOption = 256,
    seed: SeedOption = 0,
    batch_size: BatchSizeOption = 8,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "cpu",
    max_memory: MaxMemoryOption = None,
    no_protect_super_experts: Annotated[bool, typer.Option("--no-protect-super-experts",
                                                           help="Allow pruning super experts.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan without writing anything.")] = False,
    force: ForceOption = False,
    resume: ResumeOption = False,
    print_step: PrintStepOption = False,
) -> None:
    """Prune routed experts (or HEAPr neurons): calibrate (or reuse --stats), score, select, write.

    Uniform plans load with plain `AutoModelForCausalLM.from_pretrained`: the config's expert
    count is patched and router rows (and correction biases) are sliced with the experts.
    Global allocation and per-expert neuron widths are written in moecompress's own layout,
    opened with `moecompress.load(path)`. Super experts are protected unless
    --no-protect-super-experts.

    Examples:

        moecompress prune ./Qwen3-30B-A3B --method reap --ratio 0.5 --data code=code.jsonl -o ./pruned

        moecompress prune ./Qwen3-30B-A3B --method reap --ratio 0.5 --scoring sequential -o ./pruned

        moecompress prune ./Qwen3-30B-A3B --method reap --ratio 0.5 --merge centroid -o ./merged

        moecompress prune ./Qwen3-30B-A3B --method heapr --ratio 0.25 -o ./heapr

        moecompress prune ./Mixtral --method naee --keep 6 --dynamic-skip -o ./naee

        moecompress prune ./model --method premoe --ratio 0.5 --data code=c.jsonl --data math=m.jsonl --patterns p.json
    """
    if print_step:
        from moecompress.cli.recipe_bridge import echo_step

        return echo_step("prune", locals())
    from moecompress.calibration.data import parse_data_specs
    from moecompress.calibration.stats import RoutingStats
    from moecompress.models.load import load_config
    from moecompress.prune.request import PruneRequest
    from moecompress.prune.run import prune_checkpoint

    if ratio is None and keep is None:
        raise MoecompressError("pass --ratio (fraction of experts to remove) or --keep (experts kept per layer)")
    loaded_stats = RoutingStats.load(stats, expect_config=load_config(model)) if stats is not None else None
    sources = parse_data_specs(data, field=field) if data else None
    request = PruneRequest(method=method, ratio=ratio, keep=keep, params=parse_params(param), domain=domain,
                           protect_super_experts=not no_protect_super_experts, allocation=allocation,
                           new_top_k=top_k, dynamic_skip=dynamic_skip, patterns=patterns, scoring=scoring,
                           merge=merge, sources=sources, samples=samples, seq_len=seq_len, seed=seed,
                           batch_size=batch_size, dtype=dtype, device=device, max_memory=max_memory)
    result = prune_checkpoint(model, output, request, stats=loaded_stats, dry_run=dry_run, force=force,
                              resume=resume)
    print_prune_summary(result, dry_run)


def _ids(ids: list[int], limit: int = 16) -> str:
    return ", ".join(map(str, ids)) if len(ids) <= limit else ", ".join(map(str, ids[:limit])) + ", ..."


def print_prune_summary(result, dry_run: bool, console: Console | None = None) -> None:
    """Kept experts (or widths) per layer, protected super experts, parameters and bytes before/after."""
    console = console or Console()
    plan = result.plan
    title = f"{'Planned' if dry_run else 'Pruned'}: {plan.method}, {plan.allocation} allocation"
    if plan.scoring != "one-pass":
        title += f", {plan.scoring} scoring"
    if plan.merge != "none":
        title += f", {plan.merge} merging"
    table = Table(title=title + (f", domain {plan.domain}" if plan.domain else ""))
    if plan.granularity == "neuron":
        for column in ("layer", "neurons kept", "width min / mean / max", "protected (full width)"):
            table.add_column(column)
        for layer, widths in sorted(plan.widths.items()):
            total = plan.intermediate_size * len(widths)
            table.add_row(str(layer), f"{sum(widths)}/{total}",
                          f"{min(widths)} / {sum(widths) / len(widths):.1f} / {max(widths)}",
                          _ids(plan.protected.get(layer, [])) or "-")
    else:
        columns = ("layer", "kept", "kept experts", "protected") + (("merged groups",) if plan.merged else ())
        for column in columns:
            table.add_column(column)
        for layer, ids in sorted(plan.keep.items()):
            row = [str(layer), f"{len(ids)}/{plan.num_experts}", _ids(ids), _ids(plan.protected.get(layer, [])) or "-"]
            if plan.merged:
                groups = [members for members in plan.merged.get(layer, []) if len(members) > 1]
                row.append(" ".join("{" + ",".join(map(str, g)) + "}" for g in groups[:8])
                           + (" ..." if len(groups) > 8 else "") or "-")
            table.add_row(*row)
    console.print(table)
    protected = sum(len(v) for v in plan.protected.values())
    console.print(f"super experts protected: {protected}"
                  + (" (" + "; ".join(f"layer {k}: {_ids(v)}" for k, v in sorted(plan.protected.items())) + ")"
                     if protected else ""))
    verb = "would be" if dry_run else "is"
    console.print(f"parameters: {result.params_before:,} -> {result.params_after:,} "
                  f"({100 * (1 - result.params_after / max(result.params_before, 1)):.1f}% fewer)")
    console.print(f"bytes on disk: {result.bytes_before:,} -> {result.bytes_after:,}{' (estimate)' if dry_run else ''}")
    if plan.dynamic_skip:
        console.print(f"dynamic skipping: {100 * (plan.skip_fraction or 0):.1f}% of expert calls skipped on the "
                      "calibration data (beta per layer: "
                      + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(plan.dynamic_skip.items())) + ")")
    if plan.new_top_k is not None:
        console.print(f"top-k: {plan.top_k} -> {plan.new_top_k}")
    if result.patterns is not None:
        console.print(f"expert patterns for route-task written to {result.patterns}")
    if result.output is not None:
        if result.notice:
            console.print(f"[bold yellow]note:[/] {result.notice}")
            console.print(f"checkpoint {verb} in {result.output}; load it with moecompress.load({str(result.output)!r})")
        else:
            console.print(f"checkpoint {verb} in {result.output}; it loads with AutoModelForCausalLM.from_pretrained")
