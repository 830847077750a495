"""Every recipe in recipes/ runs end to end on a tiny model, so a recipe that breaks fails CI.

Tiny variants (recipes/tiny/) run as written (they use the bundled example model). The full
recipes run with their model replaced by the tiny one and their data shrunk: two small
domains (`code`, `prose`), 2 windows of 32 tokens, 2 evaluation windows, no timing. Set
$MOECOMPRESS_RECIPE_TEST_MODEL to run all of them on another small local checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from moecompress.recipe.plan import check_files, make_plan
from moecompress.recipe.runner import run_plan
from moecompress.recipe.schema import load_recipe
from tests.recipes.conftest import MODEL_ENV

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = sorted(RECIPES.rglob("*.yaml"))


def shrink(path: Path, model: Path, data: dict[str, Path]) -> list[str]:
    """`--set` overrides that run a full recipe on the tiny model in seconds."""
    sets = [f"model={model}", "calibration.samples=2", "calibration.seq_len=32",
            "calibration.domains={" + ", ".join(f"{name}: {file}" for name, file in data.items()) + "}"]
    for index, step in enumerate(load_recipe(path).recipe.steps):
        if step.op == "eval":
            sets += [f"steps.{index}.windows=2", f"steps.{index}.data=null"]
        if step.op == "condense":
            sets.append(f"steps.{index}.no_timing=true")
        if step.op in ("quantize", "compress"):
            sets.append(f"steps.{index}.min_tokens=2")
    return sets


def test_recipes_are_shipped_with_a_header_and_a_tiny_variant() -> None:
    full = sorted(path.name for path in RECIPES.glob("*.yaml"))
    assert len(full) >= 4
    assert full == sorted(path.name for path in (RECIPES / "tiny").glob("*.yaml"))
    for path in SHIPPED:
        assert path.read_text().startswith("# "), f"{path} has no comment header saying what it is for"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_shipped_recipe_runs(path: Path, tiny_model: Path, small_data: dict[str, Path], tmp_path: Path) -> None:
    tiny = path.parent.name == "tiny"
    overrides = [f"model={tiny_model}"] if tiny and os.environ.get(MODEL_ENV) else []
    if not tiny:
        overrides = shrink(path, tiny_model, small_data)
    plan = make_plan(load_recipe(path, overrides), tmp_path / "run")
    check_files(plan)
    manifest = run_plan(plan, progress=False)
    assert manifest["status"] == "done"
    assert [step["status"] for step in manifest["steps"]] == ["done"] * len(plan.steps)
    for planned in plan.steps:
        assert planned.destination().exists()
        if planned.op == "eval":
            report = json.loads((planned.folder / "eval.json").read_text())
            assert all(math.isfinite(domain["perplexity"]) for domain in report["domains"])
    final = [p for p in plan.steps if p.op == "write"][-1]
    assert (final.destination() / "config.json").is_file()
    assert json.loads((final.destination() / "moecompress_manifest.json").read_text())["operation"] in (
        "prune", "condense", "quantize", "compress")
