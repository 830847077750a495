"""Option aliases shared by every command, so the same flag means the same thing everywhere.

Use them as parameter annotations and give the default in the signature, e.g.

    def calibrate(model: ModelArg, data: DataOption = None, seq_len: SeqLenOption = 256) -> None:

Each command picks its own defaults; the flag names, short forms and help texts stay equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelArg = Annotated[
    Path,
    typer.Argument(help="Local Hugging Face checkpoint folder (config.json + safetensors).", show_default=False),
]

DataOption = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        "-d",
        help="Text data as NAME=PATH or PATH (.txt, .jsonl, .parquet, or a folder saved with datasets' "
        "save_to_disk); "
        "repeat for several domains. Default: the shipped calibration sets.",
        show_default=False,
    ),
]

FieldOption = Annotated[
    str,
    typer.Option("--field", help="Field (column) holding the text in .jsonl, .parquet and saved-dataset data."),
]

DtypeOption = Annotated[
    str,
    typer.Option("--dtype", help="Weights dtype while working: auto, float32, bfloat16 or float16."),
]

DeviceOption = Annotated[
    str,
    typer.Option("--device", help="Where layers compute: cpu, cuda, cuda:N or auto (CUDA when available). "
                 "Caches stay in host memory."),
]

MaxMemoryOption = Annotated[
    str | None,
    typer.Option("--max-memory", help="Host memory the run may plan with, e.g. 24GiB (default: 85% of what is "
                 "available). A MoE layer larger than what is left after the activations is computed a group of "
                 "experts at a time; a budget that cannot hold one layer's other weights and one expert is refused.",
                 show_default=False),
]

SeqLenOption = Annotated[
    int,
    typer.Option("--seq-len", min=2, help="Tokens per window (sequence length)."),
]

SamplesOption = Annotated[
    int,
    typer.Option("--samples", min=1, help="Number of token windows to use per domain."),
]

SeedOption = Annotated[
    int,
    typer.Option("--seed", help="Random seed (window sampling, tie breaking)."),
]

JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON object on stdout instead of tables."),
]

OutputOption = Annotated[
    Path,
    typer.Option("--output", "-o", help="Where to write the result.", show_default=False),
]

ForceOption = Annotated[
    bool,
    typer.Option("--force", help="Overwrite the output if it exists."),
]

ResumeOption = Annotated[
    bool,
    typer.Option("--resume", help="Continue a run of this same command that was killed or interrupted, from the "
                 "last decoder layer it finished (its checkpoints are kept in .OUTPUT.resume beside the output)."),
]

BatchSizeOption = Annotated[
    int,
    typer.Option("--batch-size", min=1, help="Windows per forward pass (lower it to save memory)."),
]

StreamingOption = Annotated[
    bool,
    typer.Option(
        "--streaming",
        help="Keep decoder layers on disk and read each one only while it runs (low memory, slower); "
        "a GPTQ folder stays packed and is dequantised a layer and its routed experts at a time.",
    ),
]

PrintStepOption = Annotated[
    bool,
    typer.Option(
        "--print-step",
        help="Print this command as a recipe step (YAML) and exit without running it.",
    ),
]

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Change one recipe value, KEY=VALUE with a dotted KEY (steps.1.ratio=0.25, steps.prune.ratio=0.25, "
    "model=./ckpt); VALUE is read as YAML; paths relative to the current directory. Repeatable.",
    show_default=False)]
RunDirOption = Annotated[Path | None, typer.Option(
    "--output", "-o", help="Run folder (default: the recipe's output, else moecompress-runs/NAME).",
    show_default=False)]
