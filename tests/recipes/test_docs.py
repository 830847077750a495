"""docs/recipes.md is generated from the recipe models, the CLI help and recipes/; this fails when it drifts."""

from pathlib import Path

from moecompress.cli.recipe_reference import render


def test_recipes_doc_is_up_to_date() -> None:
    committed = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
    assert committed == render(), "docs/recipes.md is stale: run `python -m moecompress.cli.recipe_reference > docs/recipes.md`"
