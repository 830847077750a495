"""`--set` overrides, path resolution, the `example:` placeholder and `recipe show`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moecompress.errors import MoecompressError
from moecompress.recipe.overrides import apply_override, parse_key
from moecompress.recipe.plan import example_root, make_plan
from moecompress.recipe.schema import load_recipe, parse_recipe
from tests.cli_helpers import run_cli
from tests.recipes.conftest import write_recipe

RECIPE = """\
version: 1
model: ../models/base
calibration:
  domains: {code: data/code.jsonl}
steps:
  - op: calibrate
  - op: prune
    ratio: 0.5
  - op: eval
    data: [held/out.txt]
  - op: write
output: runs/r
"""


def test_keys_indices_and_op_names() -> None:
    assert parse_key("steps[1].ratio") == parse_key("steps.1.ratio") == ["steps", 1, "ratio"]
    data = yaml.safe_load(RECIPE)
    assert apply_override(data, "steps.prune.ratio=0.25").location == ("steps", 1, "ratio")
    assert data["steps"][1]["ratio"] == 0.25
    apply_override(data, "steps.0.statistic=[count, max_act]")
    assert data["steps"][0]["statistic"] == ["count", "max_act"]
    apply_override(data, "calibration.seed=3")
    apply_override(data, "steps.2.windows=4")  # a new key in a step
    assert data["calibration"]["seed"] == 3 and data["steps"][2]["windows"] == 4
    apply_override(data, "steps.write.output=null")
    assert data["steps"][3]["output"] is None
    for bad, message in (("steps.1.ratio", "KEY=VALUE"), ("steps.quantize.bits=3", "no quantize step"),
                         ("steps.9.ratio=1", "below 4"), ("model.path=x", "is a value, not a section"),
                         ("steps.x y=1", "is not a key")):
        with pytest.raises(MoecompressError, match=message):
            apply_override(data, bad)


def test_paths_are_relative_to_the_file_and_set_values_to_the_cwd(tmp_path, monkeypatch) -> None:
    path = write_recipe(tmp_path / "recipes", RECIPE)
    plan = make_plan(load_recipe(path))
    assert plan.source == tmp_path / "models" / "base"
    assert plan.run_dir == tmp_path / "recipes" / "runs" / "r"
    assert plan.calibration.domains == [f"code={tmp_path / 'recipes' / 'data' / 'code.jsonl'}"]
    assert plan.steps[1].step.data == plan.calibration.domains  # inherited
    assert plan.steps[2].step.data == [str(tmp_path / "recipes" / "held" / "out.txt")]
    monkeypatch.chdir(tmp_path)
    plan = make_plan(load_recipe(path, ["model=mine", "steps.eval.data={a: x.txt}", "output=o"]))
    assert plan.source == tmp_path / "mine" and plan.run_dir == tmp_path / "o"
    assert plan.steps[2].step.data == [f"a={tmp_path / 'x.txt'}"]
    assert make_plan(load_recipe(path), "cli-out").run_dir == tmp_path / "cli-out"
    no_output = write_recipe(tmp_path, RECIPE.replace("output: runs/r\n", ""), "named.yaml")
    assert make_plan(load_recipe(no_output)).run_dir == tmp_path / "moecompress-runs" / "named"
    bundled = make_plan(load_recipe(path, ["model=example:model"]))
    assert bundled.source == example_root() / "model" and (bundled.source / "config.json").is_file()


def test_show_prints_a_plan_that_is_itself_the_same_recipe(tiny_model, tmp_path, monkeypatch, capsys) -> None:
    path = write_recipe(tmp_path, RECIPE)
    code, out, err = run_cli(["recipe", "show", str(path), "--set", f"model={tiny_model}"], monkeypatch, capsys)
    assert code == 0, err
    assert "# steps[1] prune: reads the recipe's model + statistics of steps[0]; writes" in out
    shown = yaml.safe_load(out)
    assert shown["steps"][1]["method"] == "easy_ep" and shown["steps"][1]["samples"] == 32  # defaults filled in
    assert shown["steps"][3]["output"] == str(tmp_path / "runs" / "r" / "model")
    again = make_plan(parse_recipe(shown, file=Path(tmp_path / "shown.yaml")))
    original = make_plan(load_recipe(path, [f"model={tiny_model}"]))
    assert again.to_dict() == original.to_dict()
