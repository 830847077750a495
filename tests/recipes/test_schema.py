"""Malformed recipes fail fast, in one line that names the place in the file, before any model loads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from moecompress.errors import MoecompressError
from moecompress.recipe.errors import RecipeError
from moecompress.recipe.plan import check_files, make_plan
from moecompress.recipe.schema import load_recipe
from tests.cli_helpers import error_lines, run_cli
from tests.recipes.conftest import write_recipe

GOOD = """\
version: 1
model: example:model
calibration:
  samples: 2
  seq_len: 32
steps:
  - op: calibrate
  - op: prune
    method: reap
    ratio: 0.5
  - op: quantize
    bits: 2.5
  - op: eval
    windows: 2
  - op: write
"""


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in these tests may load weights."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded while validating a recipe")

    monkeypatch.setattr("moecompress.models.load.load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _fails(tmp_path: Path, text: str, overrides: tuple[str, ...] = (), files: bool = False) -> RecipeError:
    path = write_recipe(tmp_path, text)
    started = time.perf_counter()
    with pytest.raises(MoecompressError) as caught:
        plan = make_plan(load_recipe(path, overrides), tmp_path / "run")
        if files:
            check_files(plan)
    assert time.perf_counter() - started < 2.0
    message = str(caught.value)
    assert "\n" not in message
    return caught.value


def test_the_good_recipe_validates_without_loading_anything(tmp_path) -> None:
    plan = make_plan(load_recipe(write_recipe(tmp_path, GOOD)), tmp_path / "run")
    check_files(plan)
    assert [p.op for p in plan.steps] == ["calibrate", "prune", "quantize", "eval", "write"]
    assert plan.steps[1].stats_step == 0 and plan.steps[1].input_step is None
    assert plan.steps[2].input_step == 1 and plan.steps[2].stats_step is None
    assert plan.steps[3].input == plan.steps[2].folder
    assert plan.steps[4].step.output == str(tmp_path / "run" / "model")
    assert plan.steps[1].step.samples == 2 and plan.steps[3].step.seq_len == 32  # inherited


@pytest.mark.parametrize("old, new, expected", [
    ("    ratio: 0.5", "    ratoi: 0.5", "recipe.yaml:10: steps[1].ratoi: unknown key 'ratoi'; did you mean 'ratio'?"),
    ("    ratio: 0.5", "    ratio: 1.5", "recipe.yaml:10: steps[1].ratio: must be < 1 (got 1.5)"),
    ("    ratio: 0.5", "    ratio: half", "recipe.yaml:10: steps[1].ratio: must be a number (got 'half')"),
    ("    method: reap", "    method: reapp", "recipe.yaml:9: steps[1].method: unknown pruning method 'reapp'"),
    ("    bits: 2.5", "    bits: 2.5\n    method: gptq", "recipe.yaml:13: steps[2].method: unknown value 'gptq'; "
                                                          "use one of mc-moe, gemq, uniform"),
    ("    bits: 2.5", "    bits: 2.5\n    attention_bits: 5", "steps[2].attention_bits: bits must be one of"),
    ("    bits: 2.5", "    size: 40%\n    bits: 2.5", "steps[2]: give exactly one budget: bits"),
    ("  - op: calibrate", "  - op: calibrat", "recipe.yaml:7: steps[0].op: unknown op 'calibrat'; did you mean "
                                              "'calibrate'?"),
    ("  samples: 2", "  sample: 2", "recipe.yaml:4: calibration.sample: unknown key 'sample'; did you mean 'samples'?"),
    ("  samples: 2", "  samples: 0", "recipe.yaml:4: calibration.samples: must be >= 1 (got 0)"),
    ("version: 1", "version: 2", "recipe.yaml:1: version: this moecompress reads recipe version 1 (got 2)"),
    ("    ratio: 0.5", "    ratio: 0.5\n    param: {foo: 1}", "recipe.yaml:11: steps[1].param.foo: reap has no "
                                                              "parameter 'foo'"),
    ("    ratio: 0.5", "    ratio: 0.5\n    param: [nokey]", "steps[1].param: 'nokey' must look like key=value"),
    ("    ratio: 0.5", "    ratio: 0.5\n    keep: 4", "steps[1].keep: give exactly one of ratio"),
    ("  - op: calibrate", "  - op: calibrate\n    statistic: [count, nope]", "steps[0].statistic: unknown statistic"),
    ("    ratio: 0.5", "    ratio: 0.5\n    ratio: 0.4", "recipe.yaml:11: steps[1].ratio: key 'ratio' appears twice"),
    ("    windows: 2", "    windows: [2", "recipe.yaml:15: not valid YAML"),
])
def test_malformed_recipes_fail_in_one_line_naming_the_place(tmp_path, old, new, expected) -> None:
    assert old in GOOD
    error = _fails(tmp_path, GOOD.replace(old, new))
    assert expected in str(error)


def test_step_order_and_statistics_are_checked_before_work(tmp_path) -> None:
    after_quant = GOOD.replace("  - op: eval", "  - op: prune\n    ratio: 0.25\n  - op: eval")
    assert "steps[3].op: prune cannot change the quantised checkpoint of steps[2] (quantize)" in str(
        _fails(tmp_path, after_quant))
    heapr = GOOD.replace("method: reap", "method: heapr")
    assert ("steps[1].method: heapr reads statistic(s) neuron_grad_proj that steps[0] (calibrate) does not collect; "
            "set gradients: true on steps[0]") in str(_fails(tmp_path, heapr))
    nothing = GOOD.replace("  - op: prune\n    method: reap\n    ratio: 0.5\n  - op: quantize\n    bits: 2.5\n", "")
    assert "steps[2].op: nothing to write" in str(_fails(tmp_path, nothing))
    domain = GOOD.replace("    ratio: 0.5", "    ratio: 0.5\n    domain: math")
    assert "steps[1].domain: 'math' is not a calibration domain; have: code, docs, prose" in str(
        _fails(tmp_path, domain))


def test_merging_steps_are_checked_before_work(tmp_path) -> None:
    merging = GOOD.replace("    ratio: 0.5", "    ratio: 0.5\n    merge: centroid")
    assert ("steps[1].merge: merge: centroid reads statistic(s) mean_output that steps[0] (calibrate) does not "
            "collect; add mean_output to its statistic list on steps[0]") in str(_fails(tmp_path, merging))
    collected = merging.replace("  - op: calibrate", "  - op: calibrate\n    statistic: [count, gated_out_norm, "
                                "max_act, mean_output]")
    plan = make_plan(load_recipe(write_recipe(tmp_path, collected)), tmp_path / "run")
    check_files(plan)
    assert plan.steps[1].step.merge == "centroid"
    sequential = collected.replace("    merge: centroid", "    merge: centroid\n    scoring: sequential")
    error = _fails(tmp_path, sequential, files=True)
    assert "steps[1].merge:" in str(error) and str(error).endswith("use scoring one-pass")
    assert "recipe.yaml:" in str(_fails(tmp_path, GOOD.replace("    ratio: 0.5", "    ratio: 0.5\n    merge: mean")))


def test_model_dependent_problems_are_found_from_the_config_alone(tmp_path) -> None:
    too_few = GOOD.replace("    ratio: 0.5", "    keep: 1")  # the example routes to top-2
    error = _fails(tmp_path, too_few, files=True)
    assert "recipe.yaml:10: steps[1].keep:" in str(error) and "top_k=2" in str(error)
    missing = GOOD.replace("example:model", "no-such-model")
    assert "recipe.yaml:2: model: checkpoint folder" in str(_fails(tmp_path, missing, files=True))
    data = GOOD.replace("    windows: 2", "    windows: 2\n    data: {code: nowhere.jsonl}")
    assert "recipe.yaml:15: steps[3].data: calibration data" in str(_fails(tmp_path, data, files=True))


def test_overridden_values_are_blamed_on_the_set_option(tmp_path) -> None:
    error = _fails(tmp_path, GOOD, ("steps.prune.ratio=1.5",))
    assert str(error) == "--set steps[1].ratio: must be < 1 (got 1.5)"
    assert "has 5 item(s)" in str(_fails(tmp_path, GOOD, ("steps.7.ratio=0.5",)))


def test_cli_validate_prints_one_error_line(tmp_path, monkeypatch, capsys) -> None:
    good = write_recipe(tmp_path, GOOD)
    code, out, err = run_cli(["recipe", "validate", str(good), "-o", str(tmp_path / "run")], monkeypatch, capsys)
    assert code == 0, err
    assert "ok" in out and "calibrate -> prune -> quantize -> eval -> write" in out
    bad = write_recipe(tmp_path, GOOD.replace("ratio: 0.5", "ratoi: 0.5"), "bad.yaml")
    started = time.perf_counter()
    code, out, err = run_cli(["recipe", "validate", str(bad)], monkeypatch, capsys)
    assert time.perf_counter() - started < 2.0
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1
    assert lines[0].endswith("bad.yaml:10: steps[1].ratoi: unknown key 'ratoi'; did you mean 'ratio'?")
    code, out, err = run_cli(["run", str(bad)], monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1


def test_gradient_statistics_named_in_plan_match_the_observer() -> None:
    from moecompress.calibration.observer import GRADIENT_STATISTICS
    from moecompress.recipe import plan

    assert plan.GRADIENT_STATISTICS == GRADIENT_STATISTICS
