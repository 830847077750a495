"""YAML recipes: one file chains calibrate, prune, condense, quantize, compress, eval and write.

    from moecompress.recipe import run_recipe
    run_recipe("recipes/reap-50.yaml", overrides=["model=./Qwen3-30B-A3B"], output="runs/reap")

* `schema.py`: the versioned pydantic schema, loading with one-line errors that name the line;
* `steps.py`: one model per step, its keys the option names of the CLI command of that name;
* `overrides.py`: `--set KEY=VALUE`;
* `plan.py`: paths, defaults and wiring (which checkpoint and statistics each step reads), and
  the checks against files that run before any weights load;
* `execute.py`: each step as the same library call its CLI command makes;
* `runner.py`: the run folder, its manifest, resuming.

The link to the Typer commands (`--print-step`, the parity test) and the generator of
docs/recipes.md live with the CLI (`moecompress.cli.recipe_bridge`, `moecompress.cli.recipe_reference`):
imports run cli -> recipe, never back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["load_recipe", "make_plan", "check_files", "run_plan", "run_recipe"]


def __getattr__(name: str) -> Any:
    if name == "load_recipe":
        from moecompress.recipe.schema import load_recipe

        return load_recipe
    if name in ("make_plan", "check_files"):
        from moecompress.recipe import plan

        return getattr(plan, name)
    if name == "run_plan":
        from moecompress.recipe.runner import run_plan

        return run_plan
    raise AttributeError(f"module 'moecompress.recipe' has no attribute {name!r}")


def run_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), output: str | Path | None = None,
               resume: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Load, check and run a recipe file; returns the run manifest (also saved as RUN/run.json)."""
    from moecompress.recipe.plan import check_files, make_plan
    from moecompress.recipe.runner import run_plan
    from moecompress.recipe.schema import load_recipe

    plan = make_plan(load_recipe(path, overrides), output)
    check_files(plan)
    return run_plan(plan, resume=resume, force=force, progress=progress)
