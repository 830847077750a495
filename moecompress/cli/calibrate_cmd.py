"""`moecompress calibrate`: one observed pass that saves routing statistics for every method."""

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
    DeviceOption,
    DtypeOption,
    FieldOption,
    ForceOption,
    MaxMemoryOption,
    ModelArg,
    OutputOption,
    PrintStepOption,
    ResumeOption,
    SamplesOption,
    SeedOption,
    SeqLenOption,
)

StatisticsOption = Annotated[
    list[str] | None,
    typer.Option("--statistic", "-s", help="Collect only these statistics (repeatable). Default: all but "
                 "gradients and mean_output (expert merging; every expert runs on every token).", show_default=False),
]


@app.command("calibrate")
def calibrate_command(
    model: ModelArg,
    output: OutputOption,
    data: DataOption = None,
    field: FieldOption = "text",
    samples: SamplesOption = 32,
    seq_len: SeqLenOption = 256,
    seed: SeedOption = 0,
    batch_size: BatchSizeOption = 8,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "cpu",
    max_memory: MaxMemoryOption = None,
    statistic: StatisticsOption = None,
    gradients: Annotated[bool, typer.Option("--gradients", help="Also collect HEAPr's gradient statistic "
                                            "(the loss's backward pass, one decoder layer at a time).")] = False,
    whole_model: Annotated[bool, typer.Option("--whole-model", help="Run the whole model per batch instead of one "
                                              "decoder layer at a time (more memory, same statistics).")] = False,
    force: ForceOption = False,
    resume: ResumeOption = False,
    print_step: PrintStepOption = False,
) -> None:
    """Run one calibration pass and save routing statistics (safetensors + JSON header).

    The pass walks the decoder one layer at a time, each layer read from the checkpoint only
    while it runs and computed in the checkpoint's dtype, so peak memory is about one layer
    plus activations. Every pruning and quantisation
    method reads these statistics; they refuse to load against a different model.

    Example:

        moecompress calibrate ./Qwen3-30B-A3B --data code=code.jsonl --data prose=prose.txt --samples 64 -o ./stats
    """
    # under torchrun (WORLD_SIZE > 1) the pass is data parallel and rank 0 writes: docs/distributed.md
    if print_step:
        from moecompress.cli.recipe_bridge import echo_step

        return echo_step("calibrate", locals())
    from moecompress.calibration.calibrate import calibrate_to_folder
    from moecompress.calibration.request import CalibrationRequest
    from moecompress.calibration.data import parse_data_specs
    from moecompress.calibration.observer import DEFAULT_STATISTICS, GRADIENT_STATISTICS, validate_statistics
    from moecompress.engine import distributed
    from moecompress.io.output import check_output_dir
    from moecompress.models.load import inspect_checkpoint

    # under torchrun: join the other ranks; rank 0 checks the output folder, every rank learns the verdict
    distributed.initialise(device)
    distributed.writer_only(lambda: check_output_dir(output, force, inputs=(model,)), "checking the output folder")
    with distributed.phase("reading the arguments"):
        inspect_checkpoint(model)
        sources = parse_data_specs(data, field=field) if data else None
        names = validate_statistics(statistic or DEFAULT_STATISTICS)
        if gradients:
            names = validate_statistics(list(names) + list(GRADIENT_STATISTICS))
    mode = "whole-model" if whole_model else "layerwise"
    stats = calibrate_to_folder(model, output,
                                CalibrationRequest(sources=sources, samples=samples, seq_len=seq_len, seed=seed,
                                                   batch_size=batch_size, dtype=dtype, statistics=names, mode=mode,
                                                   device=device, max_memory=max_memory), force=force, resume=resume)
    if distributed.is_writer():
        print_stats_summary(stats, Path(output))


def print_stats_summary(stats, output: Path, console: Console | None = None) -> None:
    """A per-layer table: tokens, experts used, min/max routed tokens per expert."""
    console = console or Console()
    header = stats.header
    table = Table(title=f"Routing statistics ({', '.join(header.domains)}; {header.mode})")
    for column in ("layer", "tokens", "experts used", "min tokens/expert", "max tokens/expert", "top experts"):
        table.add_column(column, justify="right" if column != "top experts" else "left")
    for layer in header.moe_layers:
        count = stats.get("count", layer) if stats.has("count") else None
        if count is None:
            continue
        top = count.argsort(descending=True)[:4].tolist()
        table.add_row(str(layer), str(stats.tokens(layer)), f"{int((count > 0).sum())}/{header.num_experts}",
                      str(int(count.min())), str(int(count.max())), ", ".join(map(str, top)))
    console.print(table)
    console.print(f"data digest {header.data_digest[:16]}, statistics: {', '.join(header.statistics)}")
    console.print(f"saved to {output}")
