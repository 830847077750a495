"""`moecompress prune`: remove routed experts and write a checkpoint standard loaders open."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from moecompress.cli.app import app
from moecompress.cli.options import (
    BatchSizeOption,
    DataOption,
    DtypeOption,
    FieldOption,
    ForceOption,
    ModelArg,
    SamplesOption,
    SeedOption,
    SeqLenOption,
)
from moecompress.errors import MoecompressError


def parse_params(values: list[str] | None) -> dict[str, Any]:
    """--param key=value pairs; values parsed as JSON when they are valid JSON, else kept as text."""
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MoecompressError(f"--param {item!r} must look like key=value")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@app.command("prune")
def prune_command(
    model: ModelArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for the pruned checkpoint.",
                                                show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="Scoring method: frequency, soft_count, reap, ean, "
                                        "easy_ep, premoe, random (see docs/methods).")] = "reap",
    ratio: Annotated[float | None, typer.Option("--ratio", help="Fraction of routed experts to remove per layer.",
                                                show_default=False)] = None,
    keep: Annotated[int | None, typer.Option("--keep", help="Routed experts to keep per layer (instead of --ratio).",
                                             show_default=False)] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Method parameter key=value (repeatable).",
                                                    show_default=False)] = None,
    domain: Annotated[str | None, typer.Option("--domain", help="Score on this calibration domain only.",
                                               show_default=False)] = None,
    stats: Annotated[Path | None, typer.Option("--stats", help="Reuse statistics from `moecompress calibrate`.",
                                               show_default=False)] = None,
    data: DataOption = None,
    field: FieldOption = "text",
    samples: SamplesOption = 32,
    seq_len: SeqLenOption = 256,
    seed: SeedOption = 0,
    batch_size: BatchSizeOption = 8,
    dtype: DtypeOption = "float32",
    no_protect_super_experts: Annotated[bool, typer.Option("--no-protect-super-experts",
                                                           help="Allow pruning super experts.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan without writing anything.")] = False,
    force: ForceOption = False,
) -> None:
    """Prune routed experts: calibrate (or reuse --stats), score, select per layer, write.

    The output loads with plain `AutoModelForCausalLM.from_pretrained`: the config's expert
    count is patched and router rows (and correction biases) are sliced with the experts.
    Super experts are protected unless --no-protect-super-experts.

    Example:

        moecompress prune ./Qwen3-30B-A3B --method reap --ratio 0.5 --data code=code.jsonl -o ./pruned
    """
    from moecompress.calibration.data import parse_data_specs
    from moecompress.calibration.stats import RoutingStats
    from moecompress.models.load import load_config
    from moecompress.prune.run import prune_checkpoint

    if ratio is None and keep is None:
        raise MoecompressError("pass --ratio (fraction of experts to remove) or --keep (experts kept per layer)")
    loaded_stats = RoutingStats.load(stats, expect_config=load_config(model)) if stats is not None else None
    sources = parse_data_specs(data, field=field) if data else None
    result = prune_checkpoint(model, output, method, ratio=ratio, keep=keep, params=parse_params(param),
                              domain=domain, stats=loaded_stats, sources=sources, samples=samples, seq_len=seq_len,
                              seed=seed, batch_size=batch_size, dtype=dtype,
                              protect_super_experts=not no_protect_super_experts, dry_run=dry_run, force=force)
    print_prune_summary(result, dry_run)


def print_prune_summary(result, dry_run: bool, console: Console | None = None) -> None:
    """Kept experts per layer, protected super experts, parameters and bytes before/after."""
    console = console or Console()
    plan = result.plan
    table = Table(title=f"{'Planned' if dry_run else 'Pruned'}: {plan.method}, {plan.allocation} allocation")
    for column in ("layer", "kept", "kept experts", "protected"):
        table.add_column(column)
    for layer, ids in sorted(plan.keep.items()):
        shown = ", ".join(map(str, ids)) if len(ids) <= 16 else ", ".join(map(str, ids[:16])) + ", ..."
        table.add_row(str(layer), f"{len(ids)}/{plan.num_experts}", shown,
                      ", ".join(map(str, plan.protected.get(layer, []))) or "-")
    console.print(table)
    verb = "would be" if dry_run else "is"
    console.print(f"parameters: {result.params_before:,} -> {result.params_after:,} "
                  f"({100 * (1 - result.params_after / max(result.params_before, 1)):.1f}% fewer)")
    console.print(f"bytes on disk: {result.bytes_before:,} -> {result.bytes_after:,}{' (estimate)' if dry_run else ''}")
    if result.output is not None:
        console.print(f"checkpoint {verb} in {result.output}; it loads with AutoModelForCausalLM.from_pretrained")
