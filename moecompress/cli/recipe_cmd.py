"""`moecompress recipe validate|show FILE`: check a recipe, or print its plan with every default filled in."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from moecompress.cli.app import app
from moecompress.cli.options import RunDirOption, SetOption


class RecipeAction(str, Enum):
    """What `moecompress recipe` does with the file."""

    validate = "validate"
    show = "show"


@app.command("recipe")
def recipe_command(
    action: Annotated[RecipeAction, typer.Argument(help="validate: check the recipe (and the files it names); "
                                                   "show: print the plan with defaults filled in.",
                                                   show_default=False)],
    recipe: Annotated[Path, typer.Argument(help="The recipe (YAML).", show_default=False)],
    set_values: SetOption = None,
    output: RunDirOption = None,
    schema_only: Annotated[bool, typer.Option("--schema-only", help="validate: check the recipe alone, not the "
                                              "model folder and data files it names.")] = False,
) -> None:
    """Check a recipe, or show the plan `moecompress run` would follow. Nothing is loaded or written.

    validate checks keys, types, methods and their parameters, the order of the steps, and
    (unless --schema-only) the model's config and the data files; a problem is one line that
    names the place in the file. show prints the recipe with every default filled in, paths
    absolute, and what each step reads and writes.

    Examples:

        moecompress recipe validate recipes/reap-50.yaml --set model=./Qwen3-30B-A3B

        moecompress recipe show recipes/tiny/reap-50.yaml
    """
    from moecompress.recipe.plan import check_files, make_plan
    from moecompress.recipe.schema import load_recipe

    plan = make_plan(load_recipe(recipe, set_values or []), output)
    if action is RecipeAction.show:
        typer.echo(plan.to_yaml(), nl=False)
        return
    if not schema_only:
        check_files(plan)
    chain = " -> ".join(step.op for step in plan.steps)
    checked = "recipe" if schema_only else "recipe, model config and data files"
    typer.echo(f"{recipe}: ok ({checked} checked): {chain}; run folder {plan.run_dir}")
