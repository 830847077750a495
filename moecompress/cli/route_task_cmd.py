"""`moecompress route-task`: PreMoe retrieval: pick the stored expert pattern nearest to a prompt file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moecompress.cli.app import app
from moecompress.cli.options import DtypeOption, FieldOption, ForceOption


@app.command("route-task")
def route_task_command(
    prompts: Annotated[Path, typer.Argument(help="Prompts of the new task: .txt, .jsonl or .parquet.",
                                            show_default=False)],
    patterns: Annotated[Path, typer.Option("--patterns", "-p", help="Patterns file written by `prune --method premoe "
                                           "--patterns`.", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for the pruned checkpoint (omit to "
                                                "only print the choice).", show_default=False)] = None,
    model: Annotated[Path | None, typer.Option("--model", help="The checkpoint the patterns were built on (default: "
                                               "the path recorded in the patterns file).", show_default=False)] = None,
    field: FieldOption = "text",
    dtype: DtypeOption = "float32",
    force: ForceOption = False,
) -> None:
    """Compute the prompts' first-MoE-layer TCESS, choose the nearest stored task (L2), write its pruned model.

    Example:

        moecompress route-task new_task.jsonl --patterns patterns.json -o ./pruned-for-task
    """
    from moecompress.prune.retrieval import route_task

    result = route_task(prompts, patterns, output, model_path=model, text_field=field, dtype=dtype, force=force)
    console = Console()
    table = Table(title=f"Nearest pattern for {prompts.name} ({result.tokens} prompt tokens)")
    table.add_column("pattern")
    table.add_column("L2 distance", justify="right")
    for name, distance in sorted(result.distances.items(), key=lambda item: item[1]):
        table.add_row(f"[bold]{name}[/]" if name == result.domain else name, f"{distance:.4f}")
    console.print(table)
    counts = result.plan.kept_counts()
    console.print(f"chosen: {result.domain} ({next(iter(counts.values()))}/{result.plan.num_experts} experts kept "
                  "per layer)")
    if result.output is not None:
        console.print(f"checkpoint is in {result.output}; it loads with AutoModelForCausalLM.from_pretrained")
