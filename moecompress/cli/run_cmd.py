"""`moecompress run`: run a YAML recipe (calibrate, prune, condense, quantize, compress, eval, write)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from moecompress.cli.app import app
from moecompress.cli.options import RunDirOption, SetOption


def print_step_result(console: Console, planned: Any, result: Any) -> None:
    """The summary the step's CLI command prints."""
    op = planned.op
    if op == "calibrate":
        from moecompress.cli.calibrate_cmd import print_stats_summary

        print_stats_summary(result, planned.folder, console)
    elif op == "prune":
        from moecompress.cli.prune_cmd import print_prune_summary

        print_prune_summary(result, False, console)
    elif op == "condense":
        from moecompress.cli.condense_cmd import print_condense_summary

        print_condense_summary(result, False, console)
    elif op in ("quantize", "compress"):
        from moecompress.cli.quant_options import print_quant_summary

        print_quant_summary(result, console)
    elif op == "eval":
        console.print(", ".join(f"{r.domain} {r.perplexity:.4f}" for r in result.results)
                      + f"; mean perplexity {result.mean_perplexity:.4f} (in {planned.folder / 'eval.json'})")
    elif op == "write":
        console.print(f"checkpoint written to {result}")


@app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="The recipe (YAML).", show_default=False)],
    set_values: SetOption = None,
    output: RunDirOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the run folder: steps whose values "
                                         "and inputs are unchanged are skipped.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over: replace the run folder (and write outputs).")
                     ] = False,
) -> None:
    """Run a recipe: every step in order, each into its folder of the run folder, with a run.json manifest.

    Each step is the CLI command of its op with the same options. One calibrate step's
    statistics feed the later prune and compress steps on the same checkpoint (as --stats).
    The recipe and the files it names are checked before any model is loaded. An interrupted
    run continues with --resume. See docs/recipes.md.

    Example:

        moecompress run recipes/reap-50.yaml --set model=./Qwen3-30B-A3B --set steps.prune.ratio=0.25 -o runs/reap
    """
    from moecompress.recipe.plan import check_files, make_plan
    from moecompress.recipe.runner import run_plan
    from moecompress.recipe.schema import load_recipe

    plan = make_plan(load_recipe(recipe, set_values or []), output)
    check_files(plan)
    console = Console()
    total = len(plan.steps)

    def report(event: str, planned: Any, result: Any) -> None:
        label = f"[{planned.index + 1}/{total}] {planned.op}"
        if event == "start":
            console.rule(f"{label} -> {planned.destination()}")
        elif event == "skip":
            console.print(f"{label}: unchanged since the last run, kept {planned.destination()}")
        else:
            print_step_result(console, planned, result)

    manifest = run_plan(plan, resume=resume, force=force, progress=True, report=report)
    from moecompress.engine import distributed

    if not distributed.is_writer():  # under torchrun rank 0 reports
        return
    ran = sum(1 for record in manifest["steps"] if not record.get("skipped"))
    console.print(f"done: {ran} step(s) ran, {total - ran} kept; run folder {plan.run_dir} (manifest run.json)")
