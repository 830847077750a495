"""The link between recipe steps and the Typer commands of the same name.

A CLI option's recipe key is its long flag without dashes, `-` as `_` (`--seq-len` ->
`seq_len`, `--format` -> `format`). `command_options(op)` maps keys to the click parameters;
`--print-step` (`echo_step`), the parity test and the generated docs all go through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from moecompress.recipe.errors import RecipeError
from moecompress.recipe.steps import CLI_ONLY, RUNNER_SET, STEP_MODELS
from moecompress.recipe.yaml_io import dump_yaml


def option_key(param: click.Parameter) -> str:
    """The recipe key of a CLI parameter: its long flag (or an argument's name), `-` -> `_`."""
    if param.param_type_name == "argument" or not param.opts:
        return str(param.name)
    longs = [opt for opt in param.opts if opt.startswith("--")]
    return (longs[0] if longs else param.opts[0]).lstrip("-").replace("-", "_")


def command_options(op: str) -> dict[str, click.Parameter]:
    """{recipe key: click parameter} of the CLI command of step `op` (help excluded)."""
    import typer

    from moecompress.cli.app import app

    command: Any = typer.main.get_command(app)
    for name in str(STEP_MODELS[op].COMMAND).split():  # `export gguf`: a command of a group
        command = command.get_command(click.Context(command), name) if command is not None else None
    if command is None:
        raise KeyError(f"no CLI command for step {op!r}")
    return {option_key(p): p for p in command.params if p.name != "help"}


def step_keys(op: str) -> dict[str, click.Parameter]:
    """The CLI options that are recipe keys of `op` (not set by the runner, not CLI-only)."""
    return {key: param for key, param in command_options(op).items()
            if key not in RUNNER_SET.get(op, {}) and key not in CLI_ONLY}


def _yaml_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_yaml_value(item) for item in value]
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):  # enums
        return value.value
    return value


def _is_default(value: Any, default: Any) -> bool:
    empty = (None, (), [])
    return value == default or (value in empty and default in empty)


def step_from_cli(op: str, values: dict[str, Any]) -> dict[str, Any]:
    """The recipe step of a CLI call: `values` are the command function's arguments (`locals()`).

    Only options that differ from their defaults are written; the result is validated as a
    recipe step, so an option the step refuses fails here as it would in a recipe.
    """
    raw: dict[str, Any] = {}
    for key, param in step_keys(op).items():
        value = values.get(str(param.name))
        if not _is_default(value, param.default):
            raw[key] = _yaml_value(value)
    from pydantic import ValidationError

    from moecompress.recipe.schema import first_problem

    model = STEP_MODELS[op]
    try:
        step = model.model_validate({"op": op, **raw})
    except ValidationError as err:
        problem = first_problem(err, {"op": op, **raw}, _no_positions())
        raise RecipeError(problem.message, problem.location) from None
    step.check(())
    return step.values(mode="json", exclude_unset=True)


def _no_positions() -> Any:
    from moecompress.recipe.yaml_io import Positions

    return Positions()


def echo_step(op: str, values: dict[str, Any]) -> None:
    """Print a CLI call as a recipe step (YAML list item) for `--print-step`."""
    import typer

    step = step_from_cli(op, values)
    typer.echo(f"# `moecompress {STEP_MODELS[op].COMMAND}` as a recipe step: paste it under `steps:`. Relative "
               "paths in a recipe are relative to the recipe file.")
    typer.echo(dump_yaml([step]), nl=False)
