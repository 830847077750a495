"""The recipe file: a versioned pydantic schema, and loading it with one-line errors that name the place.

    version: 1
    model: ./Qwen3-30B-A3B            # checkpoint folder, relative to this file
    calibration: {samples: 64, seq_len: 512, domains: {code: data/code.jsonl}}
    steps:
      - op: calibrate
      - op: prune
        method: reap
        ratio: 0.5
      - op: write
    output: runs/qwen3-reap50          # the run folder

Unknown keys are refused. `load_recipe` reads the YAML (keeping each key's line), applies
`--set` overrides, validates the structure and every step's values against the method
registries, and raises `RecipeError` ("reap.yaml:14: steps[2].ratio: must be < 1 (got 1.5)")
at the first problem in file order. Nothing here touches a model or another file.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from moecompress.errors import MoecompressError
from moecompress.recipe.errors import RecipeError, format_location
from moecompress.recipe.overrides import Override, apply_overrides
from moecompress.recipe.steps import OPS, STEP_MODELS, AnyStep, Step, _data_specs
from moecompress.recipe.yaml_io import Location, Positions, YamlError, read_yaml

RECIPE_VERSION = 1


class Calibration(BaseModel):
    """Calibration data every step reads unless it sets its own `data`, `field`, `samples`, `seq_len`, `seed`."""

    model_config = ConfigDict(extra="forbid")

    domains: Annotated[list[str] | None, BeforeValidator(_data_specs)] = Field(
        None, description="Text per domain: a mapping {name: path} (or a list of `name=path`). Files are .txt, "
        ".jsonl, .parquet or folders saved with datasets' save_to_disk, relative to the recipe file. Default: the "
        "calibration sets shipped with moecompress (code, docs, prose).")
    field: str = Field("text", min_length=1, description="Field (column) holding the text in .jsonl, .parquet and "
                       "saved-dataset data.")
    samples: int = Field(32, ge=1, description="Token windows per domain.")
    seq_len: int = Field(256, ge=2, description="Tokens per window.")
    seed: int = Field(0, description="Random seed (window sampling, tie breaking).")


class Recipe(BaseModel):
    """A compression recipe: a model, calibration data, the steps in order, and the run folder."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = Field(description="Schema version; this moecompress reads version 1.")
    model: str = Field(min_length=1, description="The input checkpoint folder, relative to the recipe file; "
                       "`example:model` is the small model bundled with moecompress.")
    calibration: Calibration = Field(default_factory=Calibration, description="Calibration data shared by the "
                                     "steps.")
    steps: list[AnyStep] = Field(min_length=1, description="The steps, run in order; each is the CLI command of "
                                 "its `op`.")
    output: str | None = Field(None, description="The run folder (step artifacts, run.json, and `model/` from a "
                               "write step), relative to the recipe file. Default: moecompress-runs/NAME in the "
                               "current directory; `moecompress run -o` overrides it.")


@dataclass
class LoadedRecipe:
    """A validated recipe with where it came from (for errors and relative paths)."""

    recipe: Recipe
    file: Path | None
    positions: Positions = field(default_factory=Positions)
    overrides: list[Override] = field(default_factory=list)

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths written in the file are relative to."""
        return self.file.resolve().parent if self.file is not None else Path.cwd()

    def error(self, err: RecipeError) -> RecipeError:
        """`err` with the line in the file, or marked as coming from `--set`."""
        for override in reversed(self.overrides):
            if err.location and override.covers(err.location):
                return RecipeError(err.message, err.location, None, "--set")
        return err.placed(self.positions, self.file)


# --- pydantic errors -> one line ----------------------------------------------------------------

TYPE_TAGS = re.compile(r"^(str|int|float|bool|list|dict|none|function-.*|.*\[.*)$")


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _clean_location(loc: tuple[Any, ...]) -> Location:
    """Drop pydantic's union-member and discriminator tags: ('steps', 2, 'prune', 'ratio') -> ('steps', 2, 'ratio')."""
    out: list[str | int] = []
    for index, part in enumerate(loc):
        if isinstance(part, str):
            after_step = len(out) == 2 and out[0] == "steps" and isinstance(out[1], int) and index == 2
            if (after_step and part in OPS) or TYPE_TAGS.match(part):
                continue
        out.append(part)
    return tuple(out)


def _keys_at(location: Location, data: Any) -> list[str]:
    """The keys allowed in the section that holds `location`."""
    parent = location[:-1]
    if parent == ():
        return list(Recipe.model_fields)
    if parent == ("calibration",):
        return list(Calibration.model_fields)
    if len(parent) == 2 and parent[0] == "steps" and isinstance(parent[1], int):
        try:
            op = data["steps"][parent[1]].get("op")
        except (KeyError, IndexError, TypeError, AttributeError):
            op = None
        model = STEP_MODELS.get(op)
        if model is not None:
            return list(model.model_fields)
    return []


def _unknown_key(name: str, allowed: list[str], what: str) -> str:
    close = difflib.get_close_matches(name.replace("-", "_"), allowed, n=1, cutoff=0.6)
    if close:
        return f"unknown key {name!r}; did you mean {close[0]!r}?"
    return f"unknown key {name!r} in {what}; allowed: {', '.join(allowed)}"


def describe_error(error: dict[str, Any], data: Any) -> tuple[Location, str]:
    """One pydantic error as (location, message)."""
    location = _clean_location(tuple(error["loc"]))
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "extra_forbidden":
        where = format_location(location[:-1]) or "the recipe"
        allowed = _keys_at(location, data)
        if len(location) == 3 and location[0] == "steps":
            op = (data["steps"][location[1]] or {}).get("op")
            where = f"a {op} step"
        return location, _unknown_key(str(location[-1]), allowed, where)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        if kind == "union_tag_not_found":
            return location, f"each step needs op: one of {', '.join(OPS)}"
        tag = str(ctx.get("tag", value))
        close = difflib.get_close_matches(tag, OPS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return location + ("op",), f"unknown op {tag!r}; {hint}ops: {', '.join(OPS)}"
    if kind == "missing":
        name = location[-1] if location else ""
        hints = {"version": f"required: write version: {RECIPE_VERSION}",
                 "model": "required: the checkpoint folder (or pass --set model=PATH)",
                 "steps": "required: the list of steps"}
        return location, hints.get(name, "required")
    if kind == "literal_error":
        if location == ("version",):
            return location, f"this moecompress reads recipe version {RECIPE_VERSION} (got {_shown(value)})"
        expected = str(ctx.get("expected", "")).replace("'", "")
        return location, f"unknown value {_shown(value)}; use one of {expected.replace(' or ', ', ')}"
    if kind == "too_short" and location == ("steps",):
        return location, "add at least one step"
    limits = {"less_than": "<", "less_than_equal": "<=", "greater_than": ">", "greater_than_equal": ">="}
    if kind in limits:
        bound = next(iter(ctx.values())) if ctx else "?"
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return location, f"must be {limits[kind]} {bound} (got {_shown(value)})"
    types = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "text", "list": "a list",
             "dict": "a mapping of keys to values", "model": "a mapping of keys to values"}
    for prefix, noun in types.items():
        if kind.startswith(prefix + "_") and kind.endswith(("_type", "_parsing", "_from_float", "_attributes_type")):
            return location, f"must be {noun} (got {_shown(value)})"
    message = str(error["msg"]).removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    return location, f"{message} (got {_shown(value)})" if value is not None and kind != "value_error" else message


def first_problem(err: ValidationError, data: Any, positions: Positions) -> RecipeError:
    """The first of pydantic's errors in file order, as a `RecipeError`."""
    problems = [describe_error(error, data) for error in err.errors()]
    problems.sort(key=lambda item: positions.line(item[0]) or 10**9)
    location, message = problems[0]
    return RecipeError(message, location)


# --- loading --------------------------------------------------------------------------------


def parse_recipe(data: Any, positions: Positions | None = None, file: Path | None = None,
                 overrides: list[Override] | None = None) -> LoadedRecipe:
    """Validate an already-parsed recipe document (structure, then each step's registry checks)."""
    loaded_positions = positions or Positions()
    shell = LoadedRecipe(Recipe.model_construct(), file, loaded_positions, overrides or [])
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise shell.error(RecipeError(f"a recipe is a mapping with version, model and steps (got {got})"))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise shell.error(first_problem(err, data, loaded_positions)) from None
    shell.recipe = recipe
    for index, step in enumerate(recipe.steps):
        try:
            step.check(("steps", index))
        except RecipeError as err:
            raise shell.error(err) from None
    return shell


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Read, override and validate a recipe file; `RecipeError` (one line, with the line number) otherwise."""
    file = Path(path)
    if not file.is_file():
        raise MoecompressError(f"recipe {str(file)!r} does not exist" if not file.exists()
                               else f"recipe {str(file)!r} is a folder; pass the YAML file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError("is not UTF-8 text", file=file) from None
    try:
        data, positions = read_yaml(text)
    except YamlError as err:
        raise RecipeError(str(err), err.location, err.line, file) from None
    applied = apply_overrides(data, list(overrides)) if isinstance(data, dict) else []
    return parse_recipe(data, positions, file, applied)


def step_model(op: str) -> type[Step]:
    """The pydantic model of the step `op`."""
    return STEP_MODELS[op]
