"""Fixtures for the recipe tests: the tiny model (overridable) and small calibration text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moecompress.recipe.plan import example_root

MODEL_ENV = "MOECOMPRESS_RECIPE_TEST_MODEL"  # run the recipe tests on another small local checkpoint


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The bundled example model (4 layers x 8 experts, top-2), or the checkpoint named by $MOECOMPRESS_RECIPE_TEST_MODEL."""
    override = os.environ.get(MODEL_ENV)
    return Path(override).resolve() if override else example_root() / "model"


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small domains (`code`, `prose`) cut from the example's held-out text: fast to tokenize."""
    folder = tmp_path_factory.mktemp("recipe-data")
    files = {}
    for name, source in (("code", "python.jsonl"), ("prose", "prose.jsonl")):
        lines = (example_root() / "eval" / source).read_text().splitlines()[:24]
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("\n".join(lines) + "\n")
    return files


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    """Write recipe text into `folder`; return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path
