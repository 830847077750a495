"""`moecompress condense`: turn chosen MoE layers into dense layers with fixed experts (CD-MoE)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    PrintStepOption,
    SamplesOption,
    SeedOption,
    SeqLenOption,
)


@app.command("condense")
def condense_command(
    model: ModelArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for the condensed checkpoint.",
                                                show_default=False)] = None,
    layers: Annotated[str, typer.Option("--layers", help="Decoder layers to condense (e.g. 3,5,7 or 3-5), or auto to "
                                        "choose them greedily by the effect on the last hidden states.")] = "auto",
    experts: Annotated[int, typer.Option("--experts", min=1, help="Routed experts kept in each condensed layer.")] = 2,
    num_layers: Annotated[int | None, typer.Option("--num-layers", min=1, help="With --layers auto: how many layers "
                                                   "to condense (default: half the MoE layers).",
                                                   show_default=False)] = None,
    criterion: Annotated[str, typer.Option("--criterion", help="Search criterion: recon (reconstruction error, one "
                                           "pass) or js (the paper's Jensen-Shannon search, slower).")] = "recon",
    layout: Annotated[str, typer.Option("--layout", help="auto: a stock transformers checkpoint when the config can "
                                        "hold dense layers there, else moecompress's layout; transformers; "
                                        "moecompress.")] = "auto",
    data: DataOption = None,
    field: FieldOption = "text",
    samples: SamplesOption = 32,
    seq_len: SeqLenOption = 256,
    seed: SeedOption = 0,
    batch_size: BatchSizeOption = 8,
    dtype: DtypeOption = "float32",
    no_timing: Annotated[bool, typer.Option("--no-timing", help="Skip the CPU forward-time measurement.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Search and print the plan without writing anything.")
                       ] = False,
    force: ForceOption = False,
    print_step: PrintStepOption = False,
) -> None:
    """Condense MoE layers (CD-MoE, arXiv 2412.00069): no routing, fixed experts with fixed weights.

    Each condensed layer sends every token through the same --experts routed experts, weighted
    by their mean gate on the calibration data, plus the shared experts. That is exactly one
    dense MLP. Experts are chosen greedily per layer; with --layers auto the layers are chosen
    greedily too. Qwen3-MoE, DeepSeek-style and other configs that can mark layers dense get a
    checkpoint plain transformers loads; others get moecompress's layout (open it with `moecompress.load`).

    Example:

        moecompress condense ./Qwen3-30B-A3B --layers auto --num-layers 8 --experts 4 --data code=code.jsonl -o ./out
    """
    if print_step:
        from moecompress.cli.recipe_bridge import echo_step

        return echo_step("condense", locals())
    from moecompress.calibration.data import parse_data_specs
    from moecompress.condense.run import CondenseRequest, condense_checkpoint, parse_layers

    sources = parse_data_specs(data, field=field) if data else None
    request = CondenseRequest(layers=parse_layers(layers), experts=experts, num_layers=num_layers,
                              criterion=criterion.lower(), layout=layout.lower(), sources=sources, samples=samples,
                              seq_len=seq_len, seed=seed, batch_size=batch_size, dtype=dtype, timing=not no_timing)
    from moecompress.engine import distributed

    distributed.initialise("cpu")  # under torchrun rank 0 condenses while the others wait (docs/distributed.md)
    result = distributed.writer_only(lambda: condense_checkpoint(model, output, request, dry_run=dry_run, force=force),
                                     "condensing")
    if distributed.is_writer():
        print_condense_summary(result, dry_run)


def print_condense_summary(result, dry_run: bool, console: Console | None = None) -> None:
    """Condensed layers with their experts and weights, sizes, forward time and search cost."""
    console = console or Console()
    plan = result.plan
    table = Table(title=f"{'Planned' if dry_run else 'Condensed'}: {len(plan.layers)} layer(s), "
                        f"{plan.experts_per_layer} of {plan.num_experts} experts each, criterion {plan.criterion}")
    for column in ("layer", "experts (greedy order)", "weights wbar", f"{plan.criterion} after search"):
        table.add_column(column)
    for layer in sorted(plan.layers):
        search = plan.expert_search.get(layer, [])
        table.add_row(str(layer), ", ".join(map(str, plan.experts[layer])),
                      ", ".join(f"{w:.3f}" for w in plan.weights[layer]), f"{search[-1]:.4g}" if search else "-")
    console.print(table)
    if plan.layer_search:
        order = ", ".join(f"{layer} ({value:.3g})" for layer, value in zip(plan.layers, plan.layer_search))
        console.print(f"layers chosen in order (last-hidden-state {plan.criterion}): {order}")
    console.print(f"parameters: {result.params_before:,} -> {result.params_after:,} "
                  f"({100 * (1 - result.params_after / max(result.params_before, 1)):.1f}% fewer)")
    console.print(f"bytes on disk: {result.bytes_before:,} -> {result.bytes_after:,}{' (estimate)' if dry_run else ''}")
    if result.forward_ms_before is not None and result.forward_ms_after is not None:
        batch, length = result.timing_shape
        console.print(f"CPU forward, best of 5 ({batch}x{length} tokens, {result.threads} threads): "
                      f"{result.forward_ms_before:.1f} ms -> {result.forward_ms_after:.1f} ms "
                      f"({result.forward_ms_before / max(result.forward_ms_after, 1e-9):.2f}x)")
    cost = plan.cost
    console.print(f"search cost: {cost.get('total_seconds', 0):.1f} s, {cost.get('forward_equivalents', 0)} "
                  f"forward-pass equivalents over {cost.get('tokens', 0):,} calibration tokens")
    if result.dense_info:
        console.print(f"dense layers {result.dense_info['dense_layers']} at width {result.dense_info['width']} "
                      f"({result.dense_info['padded_neurons']} zero-padded neurons)")
    if result.layout_note:
        console.print(f"[yellow]moecompress layout: {result.layout_note}[/yellow]")
    if result.output is not None:
        how = ("AutoModelForCausalLM.from_pretrained" if result.layout == "transformers"
               else "moecompress.load (not plain from_pretrained)")
        console.print(f"checkpoint is in {result.output}; it loads with {how}")
    elif dry_run:
        console.print(f"would write the {result.layout} layout")
