"""From a validated recipe to the plan the runner follows, and the checks against files before any work.

`make_plan` (no files read):

* paths written in the recipe become absolute, relative to the recipe file (`--set` values
  and `-o` relative to the current directory; `example:` names the bundled example folder);
* each step's `data`, `field`, `samples`, `seq_len`, `seed` left unset take the recipe's
  `calibration` values;
* steps are wired: a step reads the checkpoint of the last earlier step that changed the
  model (or the recipe's `model`); `prune` and `compress` reuse the statistics of the last
  earlier `calibrate` step on the same checkpoint (the CLI's `--stats`), which must collect
  what the method reads; nothing may change a quantised checkpoint; `write` needs something
  to write;
* each step gets its folder in the run folder, `NN-op`.

`check_files` (config and safetensors headers only, no weights): the model folder is a
supported MoE checkpoint, data files exist and are readable formats, and prune / condense
requests are feasible for the model's routers (expert counts, top-k, groups).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecompress.errors import MoecompressError
from moecompress.recipe.errors import RecipeError, cli_flags_to_keys
from moecompress.recipe.schema import Calibration, LoadedRecipe
from moecompress.recipe.steps import CALIBRATION_KEY, INHERITED, QUANTIZING_OPS, STATS_OPS, Step
from moecompress.recipe.yaml_io import Location, dump_yaml

EXAMPLE_PREFIX = "example:"
DEFAULT_RUNS = "moecompress-runs"
PATH_KEYS = ("stats", "patterns", "output")  # step keys holding a path


def example_root() -> Path:
    """The example folder bundled with moecompress (model/, calibration/, eval/)."""
    return Path(__file__).resolve().parents[1] / "example"


def resolve_path(value: str, base: Path) -> Path:
    """An absolute path: `example:REST` inside the bundled example folder, else relative to `base`."""
    if value.startswith(EXAMPLE_PREFIX):
        return example_root() / value[len(EXAMPLE_PREFIX):].lstrip("/")
    path = Path(value).expanduser()
    return Path(os.path.abspath(path if path.is_absolute() else base / path))


def resolve_data(specs: list[str], base: Path) -> list[str]:
    """`name=path` / `path` specs with absolute paths (a whole spec that is an existing path stays a path)."""
    out = []
    for spec in specs:
        if "=" in spec and not resolve_path(spec, base).exists():
            name, raw = spec.split("=", 1)
            out.append(f"{name.strip()}={resolve_path(raw.strip(), base)}")
        else:
            out.append(str(resolve_path(spec.strip(), base)))
    return out


def domain_names(specs: list[str] | None) -> list[str]:
    """Domain names of data specs as `parse_data_specs` names them (None: the shipped sets)."""
    if specs is None:
        from moecompress.calibration.data import default_calibration_sources

        try:
            return [source.name for source in default_calibration_sources()]
        except MoecompressError:
            return []
    names = []
    for spec in specs:
        if "=" in spec and not Path(spec).exists():
            names.append(spec.split("=", 1)[0].strip())
        else:
            path = Path(spec)
            names.append(path.stem if path.is_file() else path.name)
    return names


@dataclass
class PlannedStep:
    """One step of the plan: its resolved values and what it reads and writes."""

    index: int
    step: Step  # inherited values filled in, paths absolute
    folder: Path  # the step's artifact folder in the run folder
    input: Path  # the checkpoint it reads (write: the one it copies)
    input_step: int | None  # the step whose output `input` is (None: the recipe's model)
    stats_step: int | None = None  # the calibrate step whose statistics it reuses
    inherited: tuple[str, ...] = ()  # keys taken from the recipe's calibration section

    @property
    def op(self) -> str:
        return self.step.op  # type: ignore[attr-defined]

    @property
    def name(self) -> str:
        """Folder name and label, e.g. 01-prune."""
        return f"{self.index:02d}-{self.op}"

    def where(self, key: str | None = None) -> Location:
        """Location in the recipe of this step (or of `key`, in the calibration section when inherited)."""
        if key is not None and key in self.inherited:
            return ("calibration", CALIBRATION_KEY[key])
        return ("steps", self.index) + ((key,) if key else ())

    def destination(self) -> Path:
        """Where the step's result goes: the write destination, else its folder."""
        output = getattr(self.step, "output", None)
        return Path(output) if self.op == "write" and output else self.folder


@dataclass
class Plan:
    """Everything the runner needs, resolved."""

    loaded: LoadedRecipe
    source: Path
    run_dir: Path
    calibration: Calibration
    steps: list[PlannedStep] = field(default_factory=list)

    def error(self, err: RecipeError) -> RecipeError:
        """Place an error in the recipe file (line, or `--set`)."""
        return self.loaded.error(err)

    def to_dict(self) -> dict[str, Any]:
        """The plan as a recipe document with every default filled in (`recipe show`)."""
        return {
            "version": self.loaded.recipe.version,
            "model": str(self.source),
            "calibration": self.calibration.model_dump(),
            "steps": [planned.step.values() for planned in self.steps],
            "output": str(self.run_dir),
        }

    def describe(self, planned: PlannedStep) -> str:
        """One line: what a step reads and writes."""
        reads = f"steps[{planned.input_step}]" if planned.input_step is not None else "the recipe's model"
        if planned.stats_step is not None:
            reads += f" + statistics of steps[{planned.stats_step}]"
        writes = planned.destination()
        return f"steps[{planned.index}] {planned.op}: reads {reads}; writes {writes}"

    def to_yaml(self) -> str:
        """`to_dict` as YAML, with a comment above each step saying what it reads and writes."""
        document = self.to_dict()
        steps = document.pop("steps")
        head = [f"# Plan of {self.loaded.file or 'the recipe'}: defaults filled in, paths absolute.",
                "# data: null reads the calibration sets shipped with moecompress (code, docs, prose)."]
        text = "\n".join(head) + "\n" + dump_yaml({k: document[k] for k in ("version", "model", "calibration")})
        text += "steps:\n"
        for planned, values in zip(self.steps, steps):
            text += f"# {self.describe(planned)}\n"
            text += dump_yaml([values])
        return text + dump_yaml({"output": document["output"]})


def _base_for(loaded: LoadedRecipe, location: Location) -> Path:
    """Relative paths from `--set` are relative to the current directory; the file's to the file."""
    if any(override.covers(location) for override in loaded.overrides):
        return Path.cwd()
    return loaded.base_dir


def _resolve_step(loaded: LoadedRecipe, index: int, step: Step, calibration: Calibration
                  ) -> tuple[Step, tuple[str, ...]]:
    """The step with inherited values and absolute paths."""
    where: Location = ("steps", index)
    fields = type(step).model_fields
    update: dict[str, Any] = {}
    inherited = []
    for key in INHERITED:
        if key in fields and getattr(step, key) is None:
            update[key] = getattr(calibration, CALIBRATION_KEY[key])
            inherited.append(key)
    if "data" in fields and "data" not in inherited and step.data is not None:  # type: ignore[attr-defined]
        update["data"] = resolve_data(step.data, _base_for(loaded, where + ("data",)))  # type: ignore[attr-defined]
    for key in PATH_KEYS:
        value = getattr(step, key, None) if key in fields else None
        if value is not None:
            update[key] = str(resolve_path(value, _base_for(loaded, where + (key,))))
    return step.model_copy(update=update), tuple(inherited)


GRADIENT_STATISTICS = ("neuron_grad_proj",)  # moecompress.calibration.observer's (imports torch); a test pins it


def _missing_statistics(planned: PlannedStep, calibrate: Step) -> list[str]:
    needs = planned.step.required_statistics()  # type: ignore[attr-defined]
    have = set(calibrate.statistics())  # type: ignore[attr-defined]
    return [name for name in needs if name not in have]


def make_plan(loaded: LoadedRecipe, run_dir: str | Path | None = None) -> Plan:
    """Resolve paths and defaults and wire the steps (see the module docstring); no file is read.

    run_dir: the run folder from the command line (`-o`), relative to the current directory;
    default the recipe's `output`, else moecompress-runs/NAME in the current directory.
    """
    recipe = loaded.recipe
    source = resolve_path(recipe.model, _base_for(loaded, ("model",)))
    if run_dir is not None:
        run = Path(os.path.abspath(Path(run_dir).expanduser()))
    elif recipe.output is not None:
        run = resolve_path(recipe.output, _base_for(loaded, ("output",)))
    else:
        stem = loaded.file.stem if loaded.file is not None else "recipe"
        run = Path.cwd() / DEFAULT_RUNS / stem
    calibration = recipe.calibration
    if calibration.domains is not None:
        calibration = calibration.model_copy(update={
            "domains": resolve_data(calibration.domains, _base_for(loaded, ("calibration", "domains")))})
    plan = Plan(loaded, source, run, calibration)
    if run == source or source in run.parents or run in source.parents:
        message = f"the run folder {run} and the input checkpoint overlap (one holds the other); choose another output"
        if run_dir is not None:
            raise MoecompressError(f"-o/--output: {message}")
        raise plan.error(RecipeError(message, ("output",)))

    current, producer = source, None  # the checkpoint later steps read, and the step that wrote it
    last_calibrate: int | None = None  # calibrate step on `current`
    destinations: dict[Path, int] = {}
    for index, raw in enumerate(recipe.steps):
        step, inherited = _resolve_step(loaded, index, raw, calibration)
        planned = PlannedStep(index, step, run / f"{index:02d}-{step.op}", current, producer,  # type: ignore[attr-defined]
                              inherited=inherited)
        op = planned.op
        if step.CHANGES_MODEL and producer is not None and plan.steps[producer].op in QUANTIZING_OPS:
            raise plan.error(RecipeError(
                f"{op} cannot change the quantised checkpoint of steps[{producer}] ({plan.steps[producer].op}); "
                f"move it before steps[{producer}]", planned.where("op")))
        if op == "export-gguf" and producer is not None and plan.steps[producer].op in QUANTIZING_OPS \
                and getattr(plan.steps[producer].step, "format", "gptq") == "gptq":
            raise plan.error(RecipeError(
                f"export-gguf reads float checkpoints and steps[{producer}] ({plan.steps[producer].op}) writes GPTQ "
                f"(packed integers); move export-gguf before steps[{producer}], or give steps[{producer}] format: fake",
                planned.where("op")))
        if op == "calibrate":
            last_calibrate = index
        if op in STATS_OPS and getattr(step, "stats") is None and last_calibrate is not None:
            planned.stats_step = last_calibrate
            calibrate = plan.steps[last_calibrate].step
            missing = _missing_statistics(planned, calibrate)
            if missing:
                key = "method" if op == "prune" else "prune_method"
                if op == "prune" and getattr(step, "merge") != "none" and "mean_output" in missing:
                    key = "merge"
                fix = ("set gradients: true" if set(missing) <= set(GRADIENT_STATISTICS)
                       else f"add {', '.join(missing)} to its statistic list")
                raise plan.error(RecipeError(
                    f"{getattr(step, key) if key != 'merge' else 'merge: ' + getattr(step, key)} reads statistic(s) {', '.join(missing)} that steps[{last_calibrate}] "
                    f"(calibrate) does not collect; {fix} on steps[{last_calibrate}]", planned.where(key)))
        if op == "prune" and getattr(step, "domain") is not None:
            source_step = plan.steps[planned.stats_step].step if planned.stats_step is not None else step
            names = domain_names(getattr(source_step, "data"))
            if names and step.domain not in names:  # type: ignore[attr-defined]
                raise plan.error(RecipeError(f"{step.domain!r} is not a calibration domain; have: "  # type: ignore[attr-defined]
                                             f"{', '.join(names)}", planned.where("domain")))
        if op == "write":
            if producer is None:
                raise plan.error(RecipeError("nothing to write: no earlier step changed the model; put write after "
                                             "prune, condense, quantize or compress", planned.where("op")))
            target = planned.destination() if getattr(step, "output") else run / "model"
            planned.step = step.model_copy(update={"output": str(target)})
            if target == source or source in target.parents:
                raise plan.error(RecipeError("output is the input checkpoint (or inside it); choose another folder",
                                             planned.where("output")))
            if target in destinations:
                raise plan.error(RecipeError(f"steps[{destinations[target]}] writes to {target} already; give this "
                                             "write another output", planned.where("output")))
            destinations[target] = index
        plan.steps.append(planned)
        if step.CHANGES_MODEL:
            current, producer, last_calibrate = planned.folder, index, None
    return plan


# --- checks against files (no weights) -------------------------------------------------------


def _checked(plan: Plan, location: Location, keys: list[str], fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except MoecompressError as err:
        if isinstance(err, RecipeError):
            raise
        raise plan.error(RecipeError(cli_flags_to_keys(str(err), keys), location)) from None


def _check_prune(plan: Plan, planned: PlannedStep, info: Any, shape: Any) -> Any:
    """Feasibility of a prune step for `shape` (the routers it will see); returns the shape after it (or None)."""
    from moecompress.prune.merge import check_merge_request
    from moecompress.prune.run import check_allocation, check_new_top_k
    from moecompress.prune.neurons import check_neuron_ratio
    from moecompress.prune.scorers import get_scorer
    from moecompress.prune.select import kept_count
    from moecompress.prune.sequential import check_scoring

    step = planned.step
    keys = list(type(step).model_fields)
    scorer = get_scorer(step.method)  # type: ignore[attr-defined]
    allocation = _checked(plan, planned.where("allocation"), keys, check_allocation, step.allocation, scorer, shape)  # type: ignore[attr-defined]
    _checked(plan, planned.where("scoring"), keys, check_scoring, step.scoring, scorer,  # type: ignore[attr-defined]
             scorer.parse_params(step.param), allocation, info.adapter if info is not None else None,  # type: ignore[attr-defined]
             step.dynamic_skip, step.patterns)  # type: ignore[attr-defined]
    _checked(plan, planned.where("merge"), keys, check_merge_request, step.merge, scorer.granularity,  # type: ignore[attr-defined]
             allocation, step.scoring, step.dynamic_skip, step.patterns)  # type: ignore[attr-defined]
    count_key = "ratio" if step.ratio is not None else "keep"  # type: ignore[attr-defined]
    if scorer.granularity == "neuron":
        _checked(plan, planned.where(count_key), keys, check_neuron_ratio, step.ratio, step.keep)  # type: ignore[attr-defined]
        if allocation == "uniform" and info is not None:
            _checked(plan, planned.where("allocation"), keys, info.adapter.check_width_patchable, info.config)
        if step.top_k is not None:  # type: ignore[attr-defined]
            _checked(plan, planned.where("top_k"), keys, check_new_top_k, step.top_k, shape, shape.num_experts)  # type: ignore[attr-defined]
        count = None
    else:
        count = _checked(plan, planned.where(count_key), keys, kept_count, shape, step.ratio, step.keep)  # type: ignore[attr-defined]
        _checked(plan, planned.where("top_k"), keys, check_new_top_k, step.top_k, shape,  # type: ignore[attr-defined]
                 count if allocation == "uniform" else shape.top_k)
    top_k = step.top_k if step.top_k is not None else shape.top_k  # type: ignore[attr-defined]
    if step.dynamic_skip and top_k != 2:  # type: ignore[attr-defined]
        raise plan.error(RecipeError(f"dynamic_skip is defined for top-2 routers; this output routes to top-{top_k}",
                                     planned.where("dynamic_skip")))
    if count is None or allocation != "uniform":
        return None
    return dataclasses.replace(shape, num_experts=count, top_k=top_k)


def _check_data(plan: Plan, planned: PlannedStep) -> None:
    from moecompress.calibration.data import parse_data_specs

    data = getattr(planned.step, "data", None)
    if data:
        location = planned.where("data")
        _checked(plan, location, ["data", "field"], parse_data_specs, data, field=planned.step.field)  # type: ignore[attr-defined]


def check_files(plan: Plan) -> None:
    """Check the model folder, data files, statistics folders and router feasibility; no weights are read."""
    from moecompress.calibration.stats import HEADER_FILE
    from moecompress.models.load import inspect_checkpoint
    from moecompress.prune.run import routing_shape

    info = _checked(plan, ("model",), [], inspect_checkpoint, plan.source)
    shape = routing_shape(info.adapter, info.config)
    for planned in plan.steps:
        step = planned.step
        _check_data(plan, planned)
        stats = getattr(step, "stats", None)
        if stats is not None and not (Path(stats) / HEADER_FILE).is_file():
            raise plan.error(RecipeError(f"{stats} is not a statistics folder (no {HEADER_FILE}); write one with "
                                         "a calibrate step or `moecompress calibrate`", planned.where("stats")))
        original = planned.input_step is None
        if planned.op == "prune" and shape is not None:
            shape = _check_prune(plan, planned, info if original else None, shape)
        elif planned.op == "condense" and shape is not None:
            experts = step.experts  # type: ignore[attr-defined]
            if experts > shape.num_experts:
                raise plan.error(RecipeError(f"must be at most the {shape.num_experts} routed experts per layer "
                                             f"(got {experts})", planned.where("experts")))
            shape = None  # condensed layers: later checks are left to the steps themselves
        elif step.CHANGES_MODEL:
            shape = None
