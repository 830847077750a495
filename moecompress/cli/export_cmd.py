"""`moecompress export`: write a checkpoint in another engine's format (`export gguf` for llama.cpp)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moecompress.cli.app import app
from moecompress.cli.options import (
    BatchSizeOption,
    DataOption,
    DeviceOption,
    FieldOption,
    ForceOption,
    ModelArg,
    PrintStepOption,
    SamplesOption,
    SeedOption,
    SeqLenOption,
)

export_app = typer.Typer(
    name="export",
    help="Write a checkpoint in a format another engine runs: `export gguf` for llama.cpp.\n\n"
         "Example:\n\n    moecompress export gguf ./pruned -o pruned.gguf",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(export_app, name="export")


@export_app.command("gguf")
def gguf_command(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The GGUF file to write (e.g. model.gguf).",
                                         show_default=False)],
    type_: Annotated[str, typer.Option("--type", "-t", help="Tensor type: f32, f16, bf16, q8_0, or auto (the "
                                       "checkpoint's stored dtype; FP8 / MXFP4 ones: the dtype they dequantise to); "
                                       "ignored with --bits / --size. "
                                       "Norms and router weights stay f32.")] = "auto",
    bits: Annotated[float | None, typer.Option("--bits", help="Allocate one type per tensor (Q4_0, Q4_1, Q5_0, Q5_1, "
                                               "Q8_0) for this average bits per weight over the matrices "
                                               "not kept f32, block scales counted (Q4_0 = 4.5), chosen by "
                                               "calibration error (LP). See docs/gguf.md.", show_default=False)] = None,
    size: Annotated[str | None, typer.Option("--size", help="Allocate types for this file size instead: 3GB, 2.5GiB, "
                                             "or a percentage of the checkpoint's safetensors bytes (60%).",
                                             show_default=False)] = None,
    sensitivity: Annotated[str, typer.Option("--sensitivity", help="How --bits / --size weigh a tensor's error at a "
                                             "type: fisher (by the loss's squared gradient at its outputs, from a "
                                             "backward pass one layer at a time) or output (its output error, "
                                             "every tensor alike; forward only). See docs/gguf.md.")] = "fisher",
    data: DataOption = None,
    field: FieldOption = "text",
    samples: SamplesOption = 32,
    seq_len: SeqLenOption = 256,
    seed: SeedOption = 0,
    batch_size: BatchSizeOption = 8,
    device: DeviceOption = "cpu",
    force: ForceOption = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Do not show the progress bar.")] = False,
    print_step: PrintStepOption = False,
) -> None:
    """Write a checkpoint as one GGUF file that llama.cpp (and what builds on it) runs.

    Reads the checkpoint one decoder layer at a time and writes the file tensor by tensor to a
    temporary file beside OUTPUT, renamed when complete. Unpruned and uniformly pruned
    qwen3_moe, deepseek_v3 and mixtral checkpoints with a byte-level BPE tokenizer are written;
    moecompress's non-uniform layouts (per-layer expert counts, per-expert widths) and GPTQ
    folders are refused, since llama.cpp holds one expert count and width per model and reads
    float or its own quantised types. See docs/gguf.md.

    Examples:

        moecompress export gguf ./pruned -o pruned.gguf

        moecompress export gguf ./Qwen3-30B-A3B --type q8_0 -o qwen3-q8_0.gguf

        moecompress export gguf ./pruned --bits 5.5 -o pruned-mix.gguf

        llama-cli -m pruned.gguf -p "def fibonacci(n):" -n 64
    """
    if print_step:
        from moecompress.cli.recipe_bridge import echo_step

        return echo_step("export-gguf", locals())
    from moecompress.export.gguf import export_gguf

    from moecompress.engine import distributed

    mix = _mix_options(bits, size, data, field, samples, seq_len, seed, sensitivity, batch_size, device)
    distributed.initialise("cpu")  # under torchrun rank 0 exports while the others wait (docs/distributed.md)
    result = distributed.writer_only(
        lambda: export_gguf(model, output, output_type=type_, force=force, progress=not no_progress, mix=mix),
        "exporting the GGUF file")
    if not distributed.is_writer():
        return
    kinds = ", ".join(f"{count} {name}" for name, count in sorted(result.type_counts.items()))
    typer.echo(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB): llama.cpp arch {result.arch}, type "
               f"{result.output_type}, {result.tensors} tensors ({kinds}), pre-tokenizer {result.pre_tokenizer}")
    if result.allocation is not None:
        for line in _mix_summary(result):
            typer.echo(line)


def _mix_options(bits: float | None, size: str | None, data: list[str] | None, field: str, samples: int,
                 seq_len: int, seed: int, sensitivity: str, batch_size: int, device: str):  # noqa: ANN202
    """MixOptions for `--bits` / `--size`, None without either."""
    from moecompress.calibration.data import parse_data_specs
    from moecompress.export.gguf_budget import parse_budget
    from moecompress.export.gguf_mix import SENSITIVITIES, MixOptions

    if sensitivity not in SENSITIVITIES:
        raise typer.BadParameter(f"{sensitivity!r} is not one of {', '.join(SENSITIVITIES)}",
                                 param_hint="--sensitivity")
    budget = parse_budget(bits, size)
    if budget is None:
        return None
    from moecompress.engine.layers import resolve_device

    resolve_device(device)  # an unknown or missing device: a one-line error before any work
    sources = parse_data_specs(data, field=field) if data else None
    return MixOptions(budget=budget, sources=sources, samples=samples, seq_len=seq_len, seed=seed,
                      batch_size=batch_size, sensitivity=sensitivity, device=device)


def _mix_summary(result) -> list[str]:  # noqa: ANN001
    """The achieved bits and size, then every allocated tensor's type, one line per block."""
    from moecompress.io.gguf.types import KEEP_F32

    mix = result.allocation
    lines = [f"allocated: {mix.bits_per_weight:.3f} bits per weight over the matrices not kept f32 "
             f"({mix.allocated_bits_per_weight:.3f} over the allocated ones), {result.bytes:,} bytes, "
             f"LP {mix.status}"]
    blocks: dict[str, list[str]] = {}
    for name, qtype in mix.types.items():
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0] == "blk" else "outside blocks"
        short = ".".join(parts[2:-1]) if parts[0] == "blk" else ".".join(parts[:-1])
        if short.endswith("norm") or short.split(".")[-1] in KEEP_F32 or name.endswith(".bias"):
            continue  # always f32
        blocks.setdefault(block, []).append(f"{short} {qtype.name}")
    lines += [f"  {block}: {', '.join(items)}" for block, items in blocks.items()]
    return lines
