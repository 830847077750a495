"""One pydantic model per recipe step; each step is the CLI command of the same name.

A step's keys are its command's option names (`--seq-len` -> `seq_len`, `--format` ->
`format`) with the same defaults; tests/recipes/test_parity.py compares them with the Typer
commands. The options a recipe does not set are listed in `RUNNER_SET`: the runner supplies
them (the input checkpoint is the previous step's output, `--output` is the step's folder in
the run folder, `--stats` comes from an earlier `calibrate` step).

Keys shared with the recipe's `calibration` section (`data`, `field`, `samples`, `seq_len`,
`seed`) default to null here, meaning "the recipe's calibration value".

YAML-friendly spellings are accepted and normalised: `data` as a mapping {name: path} or a
list of `name=path` / `path` strings; `param` as a mapping or `key=value` strings;
`candidates` as a list or "2,3,4"; condense `layers` as a list or "auto" / "3,5-7".

Structure and ranges are checked by pydantic; `check()` adds the checks that need the method
registries or library validators (still no model, no files).
"""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from moecompress.errors import MoecompressError
from moecompress.prune.params import parse_key_value
from moecompress.quant.settings import parse_expert_memory, settings_from_options
from moecompress.prune.scorer_names import DEFAULT_PRUNE_METHOD, check_scorer_name
from moecompress.recipe.errors import RecipeError, cli_flags_to_keys
from moecompress.recipe.yaml_io import Location

# --- YAML spellings -------------------------------------------------------------------------


def _data_specs(value: Any) -> Any:
    """{name: path} or "path" or [spec, ...] -> [spec, ...] (CLI `--data` strings)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [f"{name}={path}" for name, path in value.items()]
    return value


def _params(value: Any) -> Any:
    """["key=value", ...] (values read as JSON when they are JSON, like `--param`) -> {key: value}."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        out: dict[str, Any] = {}
        for item in value:
            try:
                key, parsed = parse_key_value(item)
            except ValueError:
                raise ValueError(f"{item!r} must look like key=value (or write param as a mapping)") from None
            out[key] = parsed
        return out
    return value


def _int_list(value: Any) -> Any:
    """"2,3,4" -> [2, 3, 4]."""
    if isinstance(value, str):
        try:
            return [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"{value!r} must be comma-separated integers, e.g. 2,3,4 (or a list)") from None
    return value


DataSpecs = Annotated[list[str] | None, BeforeValidator(_data_specs)]
Params = Annotated[dict[str, Any] | None, BeforeValidator(_params)]
IntList = Annotated[list[int] | None, BeforeValidator(_int_list)]

# Inherited from the recipe's `calibration` section when null.
TextField = Annotated[str | None, Field(min_length=1)]
Samples = Annotated[int | None, Field(ge=1)]
SeqLen = Annotated[int | None, Field(ge=2)]
Seed = int | None
BatchSize = Annotated[int, Field(ge=1)]
Dtype = str
Bits = Annotated[float | None, Field(gt=0)]

INHERITED = ("data", "field", "samples", "seq_len", "seed")  # step key -> calibration key via CALIBRATION_KEY
CALIBRATION_KEY = {"data": "domains", "field": "field", "samples": "samples", "seq_len": "seq_len", "seed": "seed"}


class Step(BaseModel):
    """Common base: unknown keys are refused; `op` names the step (and its CLI command)."""

    model_config = ConfigDict(extra="forbid")

    CHANGES_MODEL: ClassVar[bool] = False  # writes a new checkpoint that later steps read
    COMMAND: ClassVar[str | None] = None  # the CLI command this step is

    def check(self, where: Location) -> None:
        """Checks against registries and library validators; raise `RecipeError` at `where`."""
        if "dtype" in type(self).model_fields:
            _check_dtype(self.dtype, where + ("dtype",))  # type: ignore[attr-defined]

    @classmethod
    def key_order(cls) -> list[str]:
        """Keys for display: `op`, the step's own keys, then those it shares with another step's model."""
        own = [key for key in cls.__annotations__ if key in cls.model_fields]
        return ["op"] + [key for key in own if key != "op"] + [key for key in cls.model_fields if key not in own
                                                                and key != "op"]

    def values(self, **dump: Any) -> dict[str, Any]:
        """`model_dump(**dump)` with keys in `key_order`."""
        data = self.model_dump(**dump)
        return {key: data[key] for key in self.key_order() if key in data}


def _check_dtype(value: str, where: Location) -> None:
    from moecompress.dtypes import DTYPE_ALIASES

    if value.lower() not in DTYPE_ALIASES:
        raise RecipeError(f"unknown dtype {value!r}; use one of auto, float32, bfloat16, float16", where)


def _library_check(where: Location, keys: list[str], fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a library validator; its one-line error becomes a recipe error at `where`."""
    try:
        return fn(*args, **kwargs)
    except MoecompressError as err:
        raise RecipeError(cli_flags_to_keys(str(err), keys), where) from None


def check_method_params(scorer: Any, params: dict[str, Any] | None, where: Location) -> None:
    """Validate `param` against the scorer's parameter model, pointing at the bad parameter."""
    from pydantic import ValidationError

    try:
        scorer.params.model_validate(params or {})
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(part) for part in first["loc"])
        known = list(scorer.params.model_fields)
        if first["type"] == "extra_forbidden":
            takes = f"its parameters: {', '.join(known)}" if known else "it takes no parameters"
            raise RecipeError(f"{scorer.name} has no parameter {name!r}; {takes}", where + (name,)) from None
        message = str(first["msg"]).removeprefix("Value error, ")
        raise RecipeError(f"{message[:1].lower() + message[1:]} (got {first.get('input')!r})",
                          where + (name,) if name else where) from None


# --- the steps --------------------------------------------------------------------------------


class _CalibrationData(Step):
    """Keys of the steps that read calibration data (defaults from the recipe's `calibration` section)."""

    data: DataSpecs = None
    field: TextField = None
    samples: Samples = None
    seq_len: SeqLen = None
    seed: Seed = None
    batch_size: BatchSize = 8


class CalibrateStep(_CalibrationData):
    """`moecompress calibrate`: one observed pass; its statistics feed later prune / compress steps."""

    CHANGES_MODEL: ClassVar[bool] = False
    COMMAND: ClassVar[str | None] = "calibrate"
    op: Literal["calibrate"]
    dtype: Dtype = "auto"
    device: str = "cpu"
    max_memory: str | None = None
    statistic: Annotated[list[str] | None, BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = None
    gradients: bool = False
    whole_model: bool = False

    def check(self, where: Location) -> None:
        super().check(where)
        if self.statistic is not None:
            from moecompress.calibration.observer import validate_statistics  # imports torch: only when needed

            _library_check(where + ("statistic",), [], validate_statistics, self.statistic)

    def statistics(self) -> list[str]:
        """The statistics this step collects (as `moecompress calibrate` decides)."""
        from moecompress.calibration.observer import DEFAULT_STATISTICS, GRADIENT_STATISTICS, validate_statistics

        names = validate_statistics(self.statistic or DEFAULT_STATISTICS)
        if self.gradients:
            names = validate_statistics(list(names) + list(GRADIENT_STATISTICS))
        return list(names)


class PruneStep(_CalibrationData):
    """`moecompress prune`: remove routed experts (or HEAPr neurons)."""

    CHANGES_MODEL: ClassVar[bool] = True
    COMMAND: ClassVar[str | None] = "prune"
    op: Literal["prune"]
    method: str = DEFAULT_PRUNE_METHOD
    ratio: Annotated[float | None, Field(ge=0, lt=1)] = None
    keep: Annotated[int | None, Field(ge=1)] = None
    allocation: Literal["uniform", "global"] | None = None
    scoring: Literal["one-pass", "sequential"] = "one-pass"
    merge: Literal["none", "centroid", "cluster"] = "none"
    param: Params = None
    domain: str | None = None
    stats: str | None = None
    top_k: Annotated[int | None, Field(ge=1)] = None
    dynamic_skip: bool = False
    patterns: str | None = None
    dtype: Dtype = "auto"
    device: str = "cpu"
    max_memory: str | None = None
    no_protect_super_experts: bool = False

    def check(self, where: Location) -> None:
        super().check(where)
        _library_check(where + ("method",), [], check_scorer_name, self.method)  # fast: no torch import
        from moecompress.prune.scorers import get_scorer

        scorer = _library_check(where + ("method",), [], get_scorer, self.method)
        check_method_params(scorer, self.param, where + ("param",))
        if scorer.granularity == "neuron":
            if self.keep is not None:
                raise RecipeError(f"{self.method} prunes neurons: give ratio (fraction of neurons removed), not keep",
                                  where + ("keep",))
            if self.ratio is None:
                raise RecipeError(f"give ratio: the fraction of routed-expert neurons {self.method} removes", where)
        elif (self.ratio is None) == (self.keep is None):
            raise RecipeError("give exactly one of ratio (fraction of routed experts removed) or keep (experts kept "
                              "per layer)", where + (("keep",) if self.keep is not None else ()))
        if self.patterns is not None and self.method != "premoe":
            raise RecipeError("patterns stores PreMoe expert patterns: use method: premoe", where + ("patterns",))

    def required_statistics(self) -> list[str]:
        """Statistics the method reads from reused calibration statistics."""
        from moecompress.prune.run import required_statistics

        return required_statistics(self.method, not self.no_protect_super_experts, self.param, self.merge)


LOCATION = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
# QuantizeRequest field (or settings.field) -> step key
REQUEST_KEYS = {"candidate_bits": "candidates", "settings.attention": "attention_bits",
                "settings.shared_experts": "shared_bits", "settings.dense_mlp": "dense_bits",
                "settings.lm_head": "lm_head_bits", "settings.group_size": "group_size", "settings.damp": "damp"}


# Options `quantize` and `compress` share (role bits, grid, solver).
class _QuantOptions(Step):
    candidates: IntList = None
    require_top: Annotated[int, Field(ge=0)] = 1
    format: Literal["gptq", "fake"] = "gptq"
    attention_bits: int = 4
    shared_bits: int = 4
    dense_bits: int = 4
    lm_head_bits: int = 16
    group_size: int = 128
    asym: bool = False
    act_order: bool = False
    group_aware: bool = True
    damp: float = 0.01
    rtn: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 16
    weighted_hessian: bool = False
    time_limit: Annotated[float, Field(gt=0)] = 120.0
    expert_memory: str = "512MiB"
    device: str = "cpu"

    @abstractmethod
    def request_values(self, samples: int, seq_len: int, seed: int) -> dict[str, Any]:
        """`parse_request` keyword arguments (all but expert_memory), built as the CLI command builds them."""

    def quant_settings(self) -> dict[str, Any]:
        """QuantSettings values from the role-bits / grid keys, by `settings_from_options` (the CLI's too)."""
        return settings_from_options(self.model_dump())

    def expert_memory_bytes(self, where: Location) -> int:
        """`expert_memory` in bytes, by `parse_expert_memory` (the CLI's too)."""
        return _library_check(where + ("expert_memory",), ["expert_memory"], parse_expert_memory,
                              self.expert_memory)

    def check_request(self, where: Location) -> None:
        """Validate the quantisation request exactly as the CLI does (QuantizeRequest)."""
        from moecompress.quant.run import parse_request

        values = self.request_values(32, 256, 0)  # data sizes do not change validity
        values["expert_memory"] = self.expert_memory_bytes(where)
        try:
            parse_request(**values)
        except MoecompressError as err:
            keys = list(type(self).model_fields)
            head, sep, rest = str(err).partition(": ")
            parts = head.split(".") if sep and LOCATION.fullmatch(head) else []
            key = REQUEST_KEYS.get(".".join(parts[:2])) or REQUEST_KEYS.get(parts[0] if parts else "")
            if key is None and parts and parts[0] in keys:
                key = parts[0]
            if key is not None:
                raise RecipeError(cli_flags_to_keys(rest, keys), where + (key,)) from None
            raise RecipeError(cli_flags_to_keys(str(err), keys), where) from None


class QuantizeStep(_QuantOptions, _CalibrationData):
    """`moecompress quantize`: mixed-precision GPTQ with a bit-width per routed expert."""

    CHANGES_MODEL: ClassVar[bool] = True
    COMMAND: ClassVar[str | None] = "quantize"
    op: Literal["quantize"]
    bits: Bits = None
    size: str | None = None
    method: Literal["mc-moe", "gemq", "uniform"] = "gemq"
    allocation: Literal["layer", "global"] | None = None
    uniform_per_layer: bool = False
    sensitivity_quantizer: Literal["rtn", "gptq"] = "rtn"
    streaming: bool = False
    dtype: Dtype = "auto"

    def check(self, where: Location) -> None:
        super().check(where)
        self.check_request(where)

    def request_values(self, samples: int, seq_len: int, seed: int) -> dict[str, Any]:
        return dict(bits=self.bits, size=self.size, method=self.method, allocation=self.allocation,
                    candidate_bits=self.candidates, require_top=self.require_top,
                    uniform_per_layer=self.uniform_per_layer, format=self.format, settings=self.quant_settings(),
                    sensitivity_quantizer=self.sensitivity_quantizer, weighted_hessian=self.weighted_hessian,
                    min_tokens=self.min_tokens, samples=samples, seq_len=seq_len, seed=seed,
                    batch_size=self.batch_size, streaming=self.streaming, dtype=self.dtype,
                    time_limit=self.time_limit, device=self.device)


class CompressStep(_QuantOptions, _CalibrationData):
    """`moecompress compress`: joint expert dropping and mixed-precision quantisation under one budget."""

    CHANGES_MODEL: ClassVar[bool] = True
    COMMAND: ClassVar[str | None] = "compress"
    op: Literal["compress"]
    size: str | None = None
    bits: Bits = None
    prune_method: str = "reap"
    param: Params = None
    method: Literal["mc-moe", "gemq", "uniform"] = "mc-moe"
    stats: str | None = None
    no_protect_super_experts: bool = False

    def check(self, where: Location) -> None:
        super().check(where)
        _library_check(where + ("prune_method",), [], check_scorer_name, self.prune_method)
        from moecompress.prune.scorers import get_scorer

        scorer = _library_check(where + ("prune_method",), [], get_scorer, self.prune_method)
        if scorer.granularity != "expert":
            raise RecipeError(f"pruning method {self.prune_method!r} scores neurons; compress drops whole experts",
                              where + ("prune_method",))
        check_method_params(scorer, self.param, where + ("param",))
        if self.method == "uniform":
            raise RecipeError("compress chooses a width per expert: use mc-moe or gemq", where + ("method",))
        self.check_request(where)

    def request_values(self, samples: int, seq_len: int, seed: int) -> dict[str, Any]:
        return dict(bits=self.bits, size=self.size, method=self.method, candidate_bits=self.candidates,
                    require_top=self.require_top, format=self.format, settings=self.quant_settings(),
                    weighted_hessian=self.weighted_hessian, min_tokens=self.min_tokens, samples=samples,
                    seq_len=seq_len, seed=seed, batch_size=self.batch_size, time_limit=self.time_limit,
                    device=self.device)

    def required_statistics(self) -> list[str]:
        """Statistics the joint program reads from reused calibration statistics."""
        from moecompress.prune.run import required_statistics

        return required_statistics(self.prune_method, not self.no_protect_super_experts)


class CondenseStep(_CalibrationData):
    """`moecompress condense`: CD-MoE, MoE layers become dense layers with fixed experts."""

    CHANGES_MODEL: ClassVar[bool] = True
    COMMAND: ClassVar[str | None] = "condense"
    op: Literal["condense"]
    layers: str | list[int] = "auto"
    experts: Annotated[int, Field(ge=1)] = 2
    num_layers: Annotated[int | None, Field(ge=1)] = None
    criterion: Literal["recon", "js"] = "recon"
    layout: Literal["auto", "transformers", "moecompress"] = "auto"
    dtype: Dtype = "float32"
    no_timing: bool = False

    def check(self, where: Location) -> None:
        super().check(where)
        self.layer_list(where)

    def layer_list(self, where: Location = ()) -> list[int] | None:
        """Decoder layers to condense, or None for auto (as the CLI's `parse_layers`)."""
        from moecompress.condense.run import parse_layers

        if isinstance(self.layers, list):
            if not self.layers or any(layer < 0 for layer in self.layers):
                raise RecipeError("list decoder layer indices (>= 0), or write auto", where + ("layers",))
            return sorted(set(self.layers))
        return _library_check(where + ("layers",), ["layers"], parse_layers, self.layers)


class EvalStep(Step):
    """`moecompress eval`: perplexity per domain of the current checkpoint (written to eval.json)."""

    CHANGES_MODEL: ClassVar[bool] = False
    COMMAND: ClassVar[str | None] = "eval"
    op: Literal["eval"]
    data: DataSpecs = None
    field: TextField = None
    seq_len: SeqLen = None
    windows: Annotated[int, Field(ge=1)] = 32
    batch_size: BatchSize = 8
    dtype: Dtype = "float32"
    streaming: bool = False


class ExportGGUFStep(_CalibrationData):
    """`moecompress export gguf`: the current checkpoint as one GGUF file (model.gguf in the step's folder)."""

    CHANGES_MODEL: ClassVar[bool] = False
    COMMAND: ClassVar[str | None] = "export gguf"
    op: Literal["export-gguf"]
    type: str = "auto"
    bits: Annotated[float | None, Field(gt=0)] = None
    size: str | None = None
    sensitivity: Literal["fisher", "output"] = "fisher"
    device: str = "cpu"

    def check(self, where: Location) -> None:
        super().check(where)
        from moecompress.export.gguf_budget import parse_budget
        from moecompress.io.gguf.types import parse_output_type

        _library_check(where + ("type",), ["type"], parse_output_type, self.type, "bfloat16")
        _library_check(where + ("size" if self.size is not None else "bits",), ["bits", "size"], parse_budget,
                       self.bits, self.size)


class WriteStep(Step):
    """Copy the current checkpoint (the last step that changed the model) to `output`."""

    CHANGES_MODEL: ClassVar[bool] = False
    COMMAND: ClassVar[str | None] = None
    op: Literal["write"]
    output: str | None = Field(None, description="Where to put the checkpoint (default: `model/` in the run "
                                                 "folder). An existing folder is replaced only when it holds an "
                                                 "earlier output of this step.")


STEP_MODELS: dict[str, type[Step]] = {
    "calibrate": CalibrateStep,
    "prune": PruneStep,
    "condense": CondenseStep,
    "quantize": QuantizeStep,
    "compress": CompressStep,
    "eval": EvalStep,
    "export-gguf": ExportGGUFStep,
    "write": WriteStep,
}
OPS = tuple(STEP_MODELS)
QUANTIZING_OPS = ("quantize", "compress")  # outputs that no later step may change
STATS_OPS = ("prune", "compress")  # steps that reuse calibration statistics (`--stats`)

AnyStep = Annotated[
    CalibrateStep | PruneStep | CondenseStep | QuantizeStep | CompressStep | EvalStep | ExportGGUFStep | WriteStep,
    Field(discriminator="op"),
]

# CLI options a recipe step does not have: the runner sets them. `print_step` is the CLI's own.
RUNNER_SET: dict[str, dict[str, str]] = {
    "calibrate": {"model": "the current checkpoint", "output": "the step's folder", "force": "the runner"},
    "prune": {"model": "the current checkpoint", "output": "the step's folder", "dry_run": "not in recipes",
              "force": "the runner"},
    "condense": {"model": "the current checkpoint", "output": "the step's folder", "dry_run": "not in recipes",
                 "force": "the runner"},
    "quantize": {"model": "the current checkpoint", "output": "the step's folder", "json": "not in recipes",
                 "force": "the runner"},
    "compress": {"model": "the current checkpoint", "output": "the step's folder", "json": "not in recipes",
                 "force": "the runner"},
    "eval": {"model": "the current checkpoint", "json_out": "eval.json in the step's folder",
             "json": "not in recipes", "force": "the runner"},
    "export-gguf": {"model": "the current checkpoint", "output": "model.gguf in the step's folder",
                    "force": "the runner", "no_progress": "the runner"},
}
CLI_ONLY = ("print_step", "resume")  # a recipe resumes with `moecompress run --resume`
