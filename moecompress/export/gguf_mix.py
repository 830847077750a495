"""`export gguf --bits B | --size S`: calibrate, measure, allocate, and describe the mix for the manifest.

    types = argmin_{t_k} sum_k err_k(t_k)  s.t. the budget     (`gguf_allocate`; errors from `gguf_fisher`
                                                                 or `gguf_sensitivity`, `--sensitivity`)

The calibration windows are read as `quantize` reads them (`--data`, default the shipped
sets; `--samples` windows of `--seq-len` tokens per domain, seeded); the unquantised model runs
one decoder layer at a time to measure every allocated tensor at every candidate type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from moecompress.export.gguf_allocate import GGUFAllocation, TensorChoice, allocate_types, budget_units, tensor_choices
from moecompress.export.gguf_budget import CANDIDATES, GGUFBudget
from moecompress.export.gguf_fisher import measure_fisher_errors
from moecompress.export.gguf_sensitivity import SensitivityRequest, TypeErrors, measure_type_errors
from moecompress.io.gguf.arches import GGUFArch
from moecompress.io.gguf.names import GGUFNames

# how each tensor's error at a type is weighed: `fisher` by the loss's squared gradient at its outputs
# (`gguf_fisher`), `output` alike everywhere (`gguf_sensitivity`)
SENSITIVITIES: tuple[str, ...] = ("fisher", "output")

# bytes of the file's header (metadata, tokenizer, tensor table) with this `allocation` manifest entry
HeaderBytes = Callable[[dict[str, Any]], int]


@dataclass
class MixOptions:
    """How `export gguf` allocates types: the budget, the calibration data, and what may be reused."""

    budget: GGUFBudget
    sources: list[Any] | None = None  # DomainSource list; None: the shipped calibration sets
    samples: int = 32
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    candidates: tuple[GGMLQuantizationType, ...] = CANDIDATES
    sensitivity: str = "fisher"  # one of SENSITIVITIES (fisher: lower KL than output in the gguf-allocation suite)
    device: str = "cpu"  # where the calibration pass computes: cpu, cuda, cuda:N or auto
    errors: TypeErrors | None = None  # measured before (same checkpoint, same data): skip the calibration pass
    calibration: dict[str, Any] = field(default_factory=dict)  # the calibration record (set when measured)


def calibration_batches(folder: Path, options: MixOptions) -> list[tuple[str, Any]]:
    """(domain, (B, S)) calibration batches of the checkpoint's tokenizer; records the set in `options`."""
    from transformers import AutoTokenizer

    from moecompress.calibration.data import build_calibration_set, default_calibration_sources

    tokenizer = AutoTokenizer.from_pretrained(folder)
    sources = list(options.sources) if options.sources else default_calibration_sources()
    calib = build_calibration_set(tokenizer, sources, num_samples=options.samples, seq_len=options.seq_len,
                                  seed=options.seed)
    options.calibration = calib.record()
    return list(calib.domain_batches(options.batch_size))


def measure(folder: Path, names: GGUFNames, spec: GGUFArch, choices: Sequence[TensorChoice], options: MixOptions,
            info: Any = None, progress: bool = True) -> TypeErrors:
    """err(tensor, type) of every allocated tensor (reused from `options.errors` when given)."""
    wanted = {c.name: list(c.candidates) for c in choices if c.fixed is None}
    if options.errors is not None:
        missing = sorted(set(wanted) - set(options.errors))
        if not missing:
            return options.errors
    request = SensitivityRequest(wanted, calibration_batches(folder, options), progress=progress,
                                 device=options.device)
    measure_errors = measure_fisher_errors if options.sensitivity == "fisher" else measure_type_errors
    options.errors = measure_errors(folder, names, spec, request, info=info)
    return options.errors


def choose_types(planned: Sequence[tuple[str, tuple[int, ...]]], tied: bool, errors: TypeErrors,
                 options: MixOptions, header_bytes: HeaderBytes, input_bytes: int) -> tuple[list[TensorChoice],
                                                                                             GGUFAllocation]:
    """The rules, then the program: every tensor's type. `header_bytes` sizes the header for `--size`."""
    choices = tensor_choices(planned, tied, options.candidates)
    # the header with a manifest at least as long as the final one: 4-character type names (Q4_0), long numbers
    longest = {c.name: c.fixed if c.fixed is not None else GGMLQuantizationType.Q4_0 for c in choices}
    placeholder = GGUFAllocation(types=longest, bits_per_weight=99.9999, allocated_bits_per_weight=99.9999,
                                 tensor_bytes=0, objective=-1.23456e-300, status="feasible", seconds=0.0)
    header = header_bytes(mix_record(placeholder, options, 10**15)) + 64
    allocation = allocate_types(choices, errors, options.budget, header, input_bytes)
    return choices, allocation


def check_budget_early(planned: Sequence[tuple[str, tuple[int, ...]]], tied: bool, options: MixOptions,
                       input_bytes: int) -> None:
    """The budget's range check before any calibration (the header counted as 0 bytes)."""
    budget_units(tensor_choices(planned, tied, options.candidates), options.budget, 0, input_bytes)


def mix_record(allocation: GGUFAllocation, options: MixOptions, file_bytes: int | None) -> dict[str, Any]:
    """The manifest's `allocation` entry: the budget, the achieved bits and size, every tensor's type."""
    budget = options.budget
    return {
        "budget": {"bits": budget.bits} if budget.bits is not None else {"size": budget.describe()},
        "candidates": [t.name for t in options.candidates],
        "sensitivity": options.sensitivity,
        "bits_per_weight": round(allocation.bits_per_weight, 4),
        "allocated_bits_per_weight": round(allocation.allocated_bits_per_weight, 4),
        "file_bytes": file_bytes,
        "objective": float(f"{allocation.objective:.6g}"),
        "status": allocation.status,
        "calibration": options.calibration,
        "types": {name: qtype.name for name, qtype in allocation.types.items()},
    }
