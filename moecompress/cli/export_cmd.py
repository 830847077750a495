"""`moecompress export`: write a checkpoint in another engine's format (`export gguf` for llama.cpp)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moecompress.cli.app import app
from moecompress.cli.options import ForceOption, ModelArg

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
                                       "checkpoint's stored dtype; FP8 / MXFP4 ones: the dtype they dequantise to). "
                                       "Norms and router weights stay f32.")] = "auto",
    force: ForceOption = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Do not show the progress bar.")] = False,
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

        llama-cli -m pruned.gguf -p "def fibonacci(n):" -n 64
    """
    from moecompress.export.gguf import export_gguf

    result = export_gguf(model, output, output_type=type_, force=force, progress=not no_progress)
    kinds = ", ".join(f"{count} {name}" for name, count in sorted(result.type_counts.items()))
    typer.echo(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB): llama.cpp arch {result.arch}, type "
               f"{result.output_type}, {result.tensors} tensors ({kinds}), pre-tokenizer {result.pre_tokenizer}")
