"""Every recipe step has its CLI command's options, under the same names, with the same defaults."""

from __future__ import annotations

import pytest
import typer

from moecompress.cli.app import app
from moecompress.cli.recipe_bridge import command_options, step_keys
from moecompress.recipe.schema import Calibration
from moecompress.recipe.steps import CALIBRATION_KEY, CLI_ONLY, INHERITED, RUNNER_SET, STEP_MODELS

COMMAND_OPS = [op for op, model in STEP_MODELS.items() if model.COMMAND]
NO_STEP = {"inspect", "route-task", "demo", "run", "recipe"}  # commands that do not change, measure or export a model


def _same_default(step_default, cli_default) -> bool:
    empty = (None, (), [])
    return step_default == cli_default or (step_default in empty and cli_default in empty)


@pytest.mark.parametrize("op", COMMAND_OPS)
def test_step_keys_are_the_command_options(op: str) -> None:
    options = command_options(op)
    model = STEP_MODELS[op]
    keys = set(model.model_fields) - {"op"}
    assert set(RUNNER_SET[op]) <= set(options), "RUNNER_SET names an option the command does not have"
    assert keys == set(step_keys(op)), (
        f"step {op!r} and `moecompress {model.COMMAND}` differ: only in the step {sorted(keys - set(step_keys(op)))}, "
        f"only in the CLI {sorted(set(step_keys(op)) - keys)}")
    for key in keys:
        cli_default = options[key].default
        if key in INHERITED:  # null in the step means the recipe's calibration value, whose default is the CLI's
            assert model.model_fields[key].default is None
            step_default = Calibration.model_fields[CALIBRATION_KEY[key]].default
        else:
            step_default = model.model_fields[key].default
        assert _same_default(step_default, cli_default), f"{op}.{key}: step {step_default!r} != CLI {cli_default!r}"


def test_every_command_has_a_step_or_is_listed_as_having_none() -> None:
    root = typer.main.get_command(app)
    commands = set(root.commands)
    with_steps = {STEP_MODELS[op].COMMAND.split()[0] for op in COMMAND_OPS}  # `export gguf`: the `export` group
    assert commands == with_steps | NO_STEP
    for op in COMMAND_OPS:
        assert "print_step" in command_options(op), f"`moecompress {op}` has no --print-step"
        assert set(CLI_ONLY) >= set(command_options(op)) - set(STEP_MODELS[op].model_fields) - set(RUNNER_SET[op]), \
            f"`moecompress {op}` has an option that is neither a recipe key, set by the runner, nor listed in CLI_ONLY"
