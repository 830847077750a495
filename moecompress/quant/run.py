"""`moecompress quantize` end to end: calibrate -> sensitivity -> allocate bits -> quantise -> write.

Every check that needs no model (options, output folder, widths vs format) runs first. The
input checkpoint is never modified; the output is built in a temporary sibling folder and
renamed into place when complete.

Methods: ``mc-moe`` (block-output errors, one program per layer), ``gemq`` (Fisher-weighted
errors from the loss's backward pass, streamed one decoder layer at a time, one global
program), ``uniform`` (every routed expert at --bits, no sensitivity pass).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from moecompress.engine import distributed
from moecompress.engine.resume import RunCheckpoints, source_fingerprint
from moecompress.errors import MoecompressError
from moecompress.quant.allocate import Allocation, AllocationRules, SolverOptions, allocate, check_budget
from moecompress.quant.budget import expert_sizes, fixed_bytes, parse_size
from moecompress.quant.plan import QuantPlan
from moecompress.quant.settings import QuantSettings
from moecompress.quant.layer_pass import DEFAULT_EXPERT_MEMORY
from moecompress.quant.spec import SUPPORTED_BITS

log = logging.getLogger(__name__)

METHODS = ("mc-moe", "gemq", "uniform")
FORMATS = ("gptq", "fake")
DEFAULT_CANDIDATES = (2, 3, 4)
UNIFORM_LAYER_CANDIDATES = (4, 8)


class QuantizeRequest(BaseModel):
    """Every option of a quantisation run, validated before any work."""

    model_config = ConfigDict(extra="forbid")

    bits: float | None = None
    size: str | None = None
    method: Literal["mc-moe", "gemq", "uniform"] = "gemq"  # the measured best (benchmarks/RESULTS.md)
    allocation: Literal["layer", "global"] | None = None  # default: layer for mc-moe, global for gemq
    candidate_bits: list[int] | None = None  # default {2,3,4}; {4,8} with uniform_per_layer
    require_top: int = 1
    uniform_per_layer: bool = False
    format: Literal["gptq", "fake"] = "gptq"
    settings: QuantSettings = QuantSettings()
    alpha: float = 1.0
    beta: float = 1.5
    sensitivity_quantizer: Literal["rtn", "gptq"] = "rtn"
    weighted_hessian: bool = False
    min_tokens: int = 16
    samples: int = 32
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    streaming: bool = False
    dtype: str = "auto"
    device: str = "cpu"  # where layers, Hessians and GPTQ solves run: cpu, cuda, cuda:N or auto
    time_limit: float = 120.0
    max_shard_bytes: int = 2 * 10**9
    expert_memory: int = DEFAULT_EXPERT_MEMORY  # bytes of per-expert state (Hessians, copies) per pass

    @model_validator(mode="after")
    def _check(self) -> QuantizeRequest:
        if (self.bits is None) == (self.size is None):
            raise ValueError("give exactly one budget: --bits (average bits per routed-expert weight) or --size")
        widths = self.widths()
        if not widths or any(w not in SUPPORTED_BITS for w in widths):
            raise ValueError(f"candidate widths must be among {SUPPORTED_BITS}, got {self.candidate_bits}")
        if self.method == "uniform":
            if self.bits is not None and (self.bits != int(self.bits) or int(self.bits) not in SUPPORTED_BITS):
                raise ValueError(f"--method uniform needs an integer --bits among {SUPPORTED_BITS}, got {self.bits}")
        elif self.bits is not None and self.bits < min(widths):
            raise ValueError(f"--bits {self.bits} is below the narrowest candidate width {min(widths)}; "
                             "allow narrower widths with --candidates (e.g. 2,3,4)")
        one_bit = 1 in widths or (self.method == "uniform" and self.bits == 1)
        if self.format == "gptq" and one_bit:
            raise ValueError("the GPTQ format cannot store 1-bit weights; use --format fake for 1-bit candidates")
        if self.sensitivity_quantizer == "gptq" and self.method == "uniform":
            raise ValueError("--sensitivity-quantizer gptq applies to --method mc-moe and gemq (--method uniform "
                             "measures no sensitivity); drop the option")
        if self.size is not None:
            parse_size(self.size)
        return self

    def widths(self) -> list[int]:
        """Candidate widths, sorted."""
        if self.candidate_bits is not None:
            return sorted(set(self.candidate_bits))
        return list(UNIFORM_LAYER_CANDIDATES if self.uniform_per_layer else DEFAULT_CANDIDATES)

    def scope(self) -> str:
        """Per-layer or global allocation."""
        return self.allocation or ("global" if self.method == "gemq" else "layer")

    def needs_data(self) -> bool:
        """Whether calibration data is read at all."""
        return self.method != "uniform" or self.settings.method == "gptq"


def check_model_support(adapter: Any, model_type: str, request: QuantizeRequest) -> bool:
    """Raise when the model cannot run the layer-at-a-time passes the request needs; returns whether to stream.

    Every method reads the checkpoint one decoder layer at a time (GEMQ's backward pass too,
    `moecompress.engine.backward`); `--streaming` insists on it. Architectures whose layers
    cannot be replayed one at a time keep the model in memory for RTN and GEMQ.
    """
    needs_layers = request.method == "mc-moe" or request.settings.method == "gptq"
    if needs_layers and not getattr(adapter, "layerwise_supported", True):
        raise MoecompressError(
            f"{model_type} layers pass state between layers, so GPTQ and MC-MoE cannot run one layer at a time; "
            "quantise it with --rtn and --method uniform or gemq"
        )
    layerwise = getattr(adapter, "layerwise_supported", True)
    if request.streaming and not layerwise:
        raise MoecompressError(f"{model_type} layers pass state between layers, so its checkpoint cannot be read one "
                               "layer at a time; drop --streaming")
    streams = request.streaming or layerwise or request.method != "gemq"
    if streams and not getattr(adapter, "streaming_supported", True):
        log.warning("%s cannot be read one layer at a time; quantising with the model in memory", model_type)
        return False
    return streams


def open_for_quantization(source: Path, info: Any, request: QuantizeRequest, streaming: bool, device: torch.device
                          ) -> tuple[torch.nn.Module, Any, Any]:
    """(model, adapter, reader) of the checkpoint `quantize` and `compress` work on, computing on `device`.

    Streaming: a meta-device skeleton and the reader that fills it one layer at a time;
    otherwise the whole model, moved to `device` (the reader is None).
    """
    from moecompress.models.load import load_model

    if streaming:
        from moecompress.engine.reader import CheckpointReader

        reader = CheckpointReader(source, dtype=request.dtype, info=info, device=device)
        return reader.model, reader.adapter, reader
    model, adapter = load_model(source, dtype=request.dtype)
    return model.to(device), adapter, None


def parse_request(**values: Any) -> QuantizeRequest:
    """A validated request; a one-line `MoecompressError` naming the first problem otherwise."""
    try:
        return QuantizeRequest(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        given = first.get("input")
        named = repr(given) in message
        if where and isinstance(given, str | int | float) and not isinstance(given, bool) and not named:
            message += f" (got {given!r})"  # name the value that was refused
        raise MoecompressError(f"{where + ': ' if where else ''}{message}") from None


@dataclass
class QuantizeJob:
    """What a quantisation pass works on: the opened model, its calibration data, and where it came from."""

    source: Path
    info: Any  # the checkpoint's `CheckpointInfo`
    model: torch.nn.Module  # in memory, or a meta-device skeleton read through `reader`
    adapter: Any
    reader: Any = None  # the `CheckpointReader` of a meta-device model (one decoder layer at a time)
    batches: list | None = None  # (domain, (B, S) token ids) calibration batches; None: RTN without data
    calib: Any = None  # the `CalibrationSet` the batches come from (its record goes into the manifest)
    tokenizer: Any = None  # saved with the output when given
    out_dtype: torch.dtype = torch.float32  # the dtype unquantised tensors are written in
    checkpoints: RunCheckpoints | None = None  # the run's resume checkpoints

    @property
    def element_size(self) -> int:
        """Bytes per unquantised value written (`out_dtype`)."""
        return torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class QuantizeResult:
    """What a quantisation run did."""

    plan: QuantPlan
    output: Path | None
    allocation: Allocation | None
    average_bits: float
    effective_bits: dict[str, float]
    bytes_before: int
    bytes_after: int
    fallbacks: dict[str, int] = field(default_factory=dict)
    raised_damping: dict[str, float] = field(default_factory=dict)
    format: str = "gptq"


def calibration_batches(sources: list[Any] | None, request: QuantizeRequest, tokenizer: Any
                        ) -> tuple[list[tuple[str, torch.Tensor]], Any]:
    """(domain, (B, S)) batches of the calibration set, and the set itself."""
    from moecompress.calibration.data import build_calibration_set, default_calibration_sources

    sources = list(sources) if sources else default_calibration_sources()
    calib = build_calibration_set(tokenizer, sources, num_samples=request.samples, seq_len=request.seq_len,
                                  seed=request.seed)
    return list(calib.domain_batches(request.batch_size)), calib


def measure_sensitivity(model: torch.nn.Module, adapter: Any, batches: list | None, widths: list[int],
                        request: QuantizeRequest, progress: bool, reader: Any = None,
                        checkpoints: RunCheckpoints | None = None) -> Any:
    """Per-expert costs of every candidate width: GEMQ's Fisher-weighted errors or MC-MoE's block errors.

    checkpoints: MC-MoE's layer pass saves its progress there and resumes from it (GEMQ's
    backward pass starts over).
    """
    from moecompress.engine.layers import resolve_device
    from moecompress.quant.sensitivity import CandidateSettings, block_errors, fisher_errors

    base = request.settings.spec(max(widths))
    assert base is not None
    settings = CandidateSettings(list(widths), base, quantizer=request.sensitivity_quantizer,
                                 weighted=request.weighted_hessian, min_tokens=request.min_tokens,
                                 expert_memory=request.expert_memory)
    device = resolve_device(request.device)
    if request.method == "gemq":
        return fisher_errors(model, adapter, batches, settings, progress=progress, reader=reader, device=device)
    return block_errors(model, adapter, batches, settings, progress=progress, reader=reader, device=device,
                        checkpoints=(checkpoints or RunCheckpoints.disabled()).layer_pass("sensitivity"))


def expert_widths(job: QuantizeJob, targets: Any, request: QuantizeRequest, progress: bool
                  ) -> tuple[dict[int, list[int]], Allocation | None, dict[str, float | str]]:
    """Choose a width per routed expert: uniform, or sensitivity + the integer program."""
    model, adapter, element_size = job.model, job.adapter, job.element_size
    input_bytes = job.info.bytes_on_disk
    widths = request.widths()
    settings = request.settings
    unit, budget, budget_record = expert_budget(model, adapter, targets, request, input_bytes, element_size)
    sizes = expert_sizes(adapter, targets, widths, unit, settings, element_size)
    if request.method == "uniform":
        chosen = _uniform_width(request, sizes, widths, budget)
        return {layer: [chosen] * ref.num_experts for layer, ref in targets.moe.items()}, None, budget_record
    check_budget(sizes, widths, budget, request.uniform_per_layer,  # before the sensitivity pass
                 require_top=0 if request.uniform_per_layer else request.require_top)
    sens = measure_sensitivity(model, adapter, job.batches, widths, request, progress, job.reader, job.checkpoints)
    costs = sens.costs(request.alpha, request.beta)
    check_finite_costs(costs)
    result = allocate(costs, sizes, widths, budget,
                      rules=AllocationRules(scope=request.scope(), require_top=request.require_top,
                                            uniform_per_layer=request.uniform_per_layer),
                      solving=SolverOptions(time_limit=request.time_limit))
    result = distributed.broadcast_object(result)  # under torchrun every rank quantises with rank 0's choice
    log.info("allocation: %s %s program(s), %d binaries, %s in %.2f s", result.solver, request.scope(),
             result.variables, result.status, result.seconds)
    return result.widths, result, budget_record


def check_finite_costs(costs: dict[int, torch.Tensor]) -> None:
    """Sensitivity costs (E, C) per layer without NaN or Inf, else a one-line error naming the first expert."""
    for layer, cost in sorted(costs.items()):
        bad = (~torch.isfinite(cost)).any(dim=-1).nonzero().flatten()
        if len(bad):
            raise MoecompressError(f"the sensitivity of expert {int(bad[0])} of decoder layer {layer} is NaN or Inf "
                                   f"({len(bad)} expert(s) in that layer); its activations overflow in this dtype "
                                   "(try --dtype float32) or its weights are corrupt")


def expert_budget(model: torch.nn.Module, adapter: Any, targets: Any, request: QuantizeRequest, input_bytes: int,
                  element_size: int) -> tuple[str, float, dict[str, float | str]]:
    """(size unit, budget in that unit, record for the plan)."""
    from moecompress.quant.targets import expert_params

    if request.bits is not None:
        total = sum(expert_params(adapter, ref) * ref.num_experts for ref in targets.moe.values())
        return "bits", request.bits * total, {"bits": request.bits}
    size = parse_size(request.size)  # type: ignore[arg-type]
    allowed = size.resolve(input_bytes)
    fixed = fixed_bytes(model, adapter, targets, request.settings, element_size)
    if allowed <= fixed:
        raise MoecompressError(
            f"--size {request.size} ({allowed:,} bytes) does not even hold the non-expert weights ({int(fixed):,} bytes "
            "with the current attention/shared settings); raise --size or quantise those roles further"
        )
    return "bytes", allowed - fixed, {"bytes": float(allowed), "size": request.size or "", "fixed_bytes": fixed}


def _uniform_width(request: QuantizeRequest, sizes: dict[int, torch.Tensor], widths: list[int], budget: float) -> int:
    """The width of every expert for --method uniform: --bits, or the widest candidate within --size."""
    if request.bits is not None:
        return int(request.bits)
    fitting = [w for c, w in enumerate(widths) if sum(float(s[:, c].sum()) for s in sizes.values()) <= budget]
    if not fitting:
        raise MoecompressError(f"--size {request.size} is too small even with every expert at {min(widths)} bits")
    return max(fitting)


def readme_for(plan: QuantPlan, source: Path, fmt: str, average: float) -> str:
    """The short README written into a quantised checkpoint."""
    if fmt == "gptq":
        loading = (
            "This folder is in the GPTQ format (v1 packing; per-module bits in `quantization_config.dynamic`).\n"
            "Load it with moecompress's loader:\n\n"
            "```python\nimport moecompress\nmodel = moecompress.load(\"this-folder\")\n```\n\n"
            "or with GPTQModel (`pip install gptqmodel==7.6.0`): `GPTQModel.load(\"this-folder\", device=\"cpu\")`.\n"
            "transformers' own GPTQ path loads MoE checkpoints wrongly (mixed bits fail, experts get re-initialised)\n"
            "and auto-gptq cannot load it.\n"
        )
    else:
        loading = ("This folder holds fake-quantised (dequantised) weights in the original dtype: it loads with plain\n"
                   "`transformers.AutoModelForCausalLM.from_pretrained` and is meant for measuring quality; it is\n"
                   "not smaller on disk.\n")
    return (f"# Quantised with moecompress\n\nSource: `{source}`. Method: `{plan.method}`, routed experts at "
            f"{average:.3f} average bits (candidates {plan.candidate_bits}).\n\n{loading}\n"
            "`quant_plan.json` (GPTQ format) and `moecompress_manifest.json` record the per-module plan, the "
            "achieved bits and how the output was made.\n")


def quantize_checkpoint(checkpoint: str | Path, output: str | Path, request: QuantizeRequest,
                        sources: list[Any] | None = None, force: bool = False, progress: bool = True,
                        resume: bool = False) -> QuantizeResult:
    """Quantise a local checkpoint into `output` per `request` (see the module docstring).

    Checkpoints of the run are kept beside `output` (`moecompress.engine.resume`): the
    sensitivity pass and the quantisation pass (with the shards written so far) after every
    decoder layer; `resume` continues a killed run of the same request from them.
    """
    from moecompress.engine.layers import resolve_device
    from moecompress.io.output import check_output_dir
    from moecompress.models.load import inspect_checkpoint

    source = Path(checkpoint)
    distributed.initialise(request.device)  # under torchrun: join the other ranks (data parallel, rank 0 writes)
    check_output_dir(output, force, inputs=(source,))
    resolve_device(request.device)  # a one-line error before any work when there is no such device
    info = inspect_checkpoint(source)
    with RunCheckpoints(output, "quantize", resume=resume) as checkpoints:
        checkpoints.require("options", {"request": request.model_dump(mode="json"),
                                        "sources": [repr(item) for item in sources or []]})
        checkpoints.require("input checkpoint", source_fingerprint(source))
        return _quantize(source, info, output, request, sources, force, progress, checkpoints)


def _quantize(source: Path, info: Any, output: str | Path, request: QuantizeRequest, sources: list[Any] | None,
              force: bool, progress: bool, checkpoints: RunCheckpoints) -> QuantizeResult:
    """`quantize_checkpoint` after its first checks, inside the run's checkpoints."""
    from moecompress.engine.layers import resolve_device

    from moecompress.models.load import load_tokenizer
    from moecompress.quant.settings import PlanHeader, make_plan
    from moecompress.quant.targets import find_targets
    from moecompress.sizes import checkpoint_dtype

    streaming = check_model_support(info.adapter, info.config.model_type, request)
    try:
        tokenizer = load_tokenizer(source)
    except MoecompressError:
        if request.needs_data():
            raise
        tokenizer = None  # RTN without data: a folder without a tokenizer is fine (none is copied)
    torch.manual_seed(request.seed)
    batches, calib = (calibration_batches(sources, request, tokenizer) if request.needs_data()
                      else (None, None))
    checkpoints.require("calibration data", None if calib is None else calib.digest)
    if distributed.active():
        batches = distributed.shard(batches) if batches is not None else None  # this rank's share of the batches
        progress = progress and distributed.is_writer()
    model, adapter, reader = open_for_quantization(source, info, request, streaming, resolve_device(request.device))
    job = QuantizeJob(source, info, model, adapter, reader=reader, batches=batches, calib=calib, tokenizer=tokenizer,
                      out_dtype=checkpoint_dtype(info) or torch.float32, checkpoints=checkpoints)
    targets = find_targets(model, adapter)
    if not targets.moe:
        raise MoecompressError(f"{source} has no MoE layers to quantise")
    widths, allocation, budget_record = expert_widths(job, targets, request, progress)
    allocation_record: dict[str, object] = {}
    if allocation is not None:
        allocation_record = {"solver": allocation.solver, "status": allocation.status, "gap": allocation.gap,
                             "seconds": round(allocation.seconds, 3), "objective": allocation.objective,
                             "scope": request.scope(), "variables": allocation.variables}
    plan = make_plan(targets, adapter, widths, request.settings,
                     PlanHeader(request.method, request.widths(), budget_record, allocation=allocation_record))
    result = write_quantized(job, plan, output, request, force, progress)
    result.allocation = allocation
    return result


def write_quantized(job: QuantizeJob, plan: QuantPlan, output: str | Path, request: QuantizeRequest,
                    force: bool = False, progress: bool = True, operation: str = "quantize",
                    extra_manifest: dict[str, Any] | None = None) -> QuantizeResult:
    """Quantise `job.model` per `plan` layer by layer while writing the chosen format into `output`.

    job.reader: the `CheckpointReader` a meta-device model is read from, one layer at a time.
    job.checkpoints: the output is built in their folder and the pass saves its progress there
    after every layer (`moecompress.engine.resume`); a resumed run continues both.
    """
    checkpoints = job.checkpoints or RunCheckpoints.disabled()
    model, adapter, batches, reader = job.model, job.adapter, job.batches, job.reader
    source, info, out_dtype, tokenizer, calib = job.source, job.info, job.out_dtype, job.tokenizer, job.calib
    from moecompress.engine.layers import resolve_device
    from moecompress.io.checkpoint import folder_bytes
    from moecompress.quant.fake_quant import FakeQuantWriter
    from moecompress.quant.gptq_writer import GPTQWriter
    from moecompress.io.manifest import build_manifest, write_manifest
    from moecompress.io.output import atomic_output_dir
    from moecompress.quant.apply import QuantPass, quantize_model

    average = plan.average_expert_bits()
    device = resolve_device(request.device)
    passes = QuantPass(min_tokens=request.min_tokens, weighted_hessian=request.weighted_hessian,
                       expert_memory=request.expert_memory, reader=reader, device=device)
    if distributed.active() and not distributed.is_writer():  # the same passes and collectives, nothing written
        quantize_model(model, adapter, plan, batches, options=passes, progress=False)
        return distributed.broadcast_object(None)  # type: ignore[return-value]
    with atomic_output_dir(output, force=force, folder=checkpoints.output_folder()) as tmp:
        if request.format == "gptq":
            writer: Any = GPTQWriter(tmp, model, adapter, plan, out_dtype, request.max_shard_bytes)
        else:
            writer = FakeQuantWriter(tmp, model, adapter, out_dtype, request.max_shard_bytes)
        passes = dataclasses.replace(passes, checkpoints=checkpoints.layer_pass("quantizing"), resumable=writer)
        report = quantize_model(model, adapter, plan, batches, on_layer=writer.on_layer, options=passes,
                                progress=progress)
        writer.finish()
        if request.format == "fake":
            (tmp / "quant_plan.json").write_text(plan.model_dump_json(indent=2) + "\n")
        effective = (writer.effective_bits() if request.format == "gptq"
                     else planned_effective_bits(plan, model, adapter))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = build_manifest(
            operation, plan.method, request.model_dump(mode="json"), request.seed, source, info.config,
            calibration=None if calib is None else calib.record(),
            format=request.format,
            achieved_average_bits=average,
            effective_bits_per_parameter=effective,
            expert_bits=plan.expert_bits(),
            allocation=plan.allocation,
            rtn_fallbacks=report.fallbacks,
            raised_damping=report.raised_damping,
            bytes_before=info.bytes_on_disk,
            bytes_on_disk=folder_bytes(tmp),
            device=str(device),
            world_size=distributed.world_size(),
            **({"communication_rank0": distributed.traffic()} if distributed.active() else {}),
            loads_with=("moecompress.load (moecompress.quant.load.load_quantized) or GPTQModel.load"
                        if request.format == "gptq" else "transformers.AutoModelForCausalLM.from_pretrained"),
            **(extra_manifest or {}),
        )
        write_manifest(tmp, manifest)
        (tmp / "README.md").write_text(readme_for(plan, source, request.format, average))
        bytes_after = folder_bytes(tmp)
    return distributed.broadcast_object(QuantizeResult(
        plan=plan, output=Path(output), allocation=None, average_bits=average, effective_bits=effective,
        bytes_before=info.bytes_on_disk, bytes_after=bytes_after, fallbacks=report.fallbacks,
        raised_damping=report.raised_damping, format=request.format))


def planned_effective_bits(plan: QuantPlan, model: torch.nn.Module, adapter: Any) -> dict[str, float]:
    """Bits per weight of each quantised role in the GPTQ format (codes, scales, zeros, g_idx, fp16 biases)."""
    from moecompress.quant.budget import packed_bytes

    moe = {ref.experts_path: ref for ref in adapter.moe_layers(model)}
    expert_shapes: dict[str, list[tuple[int, int, bool]]] = {}
    total_bits: dict[str, float] = {}
    params: dict[str, int] = {}
    for name, entry in plan.entries.items():
        if entry.spec is None:
            continue
        if entry.kind == "linear":
            module = model.get_submodule(name)
            shapes = [(module.out_features, module.in_features, module.bias is not None)]
        else:
            parent = name.rpartition(".")[0]
            if parent not in expert_shapes:
                expert = adapter.expert_weights(moe[parent], 0)
                pairs = [(expert.gate, expert.gate_bias), (expert.up, expert.up_bias), (expert.down, expert.down_bias)]
                expert_shapes[parent] = [(w.shape[0], w.shape[1], b is not None) for w, b in pairs if w is not None]
            shapes = expert_shapes[parent]
        for out_f, in_f, bias in shapes:
            total_bits[entry.role] = total_bits.get(entry.role, 0.0) + 8 * packed_bytes(entry.spec, out_f, in_f, 2, bias)
            params[entry.role] = params.get(entry.role, 0) + out_f * in_f
    return {role: total_bits[role] / params[role] for role in sorted(total_bits)}
