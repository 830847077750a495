"""One GGML type per GGUF tensor under a bits or size budget: a multiple-choice knapsack.

    min  sum_{k,t} err_{k,t} x_{k,t}
    s.t. sum_t x_{k,t} = 1                      every allocated tensor takes one type
         sum_{k,t} s_{k,t} x_{k,t} <= S          S: B x counted weights - fixed bits (--bits), or
                                                 S: the file's bytes - header - fixed tensors (--size)
         x binary

err_{k,t} is the calibration error of tensor k at type t (`gguf_sensitivity`), s_{k,t} its
bits (n_k bpw_t) or padded bytes. Solved by the quantiser's program (`moecompress.quant.allocate`,
PuLP with HiGHS, CBC as the fall-back), each tensor one "layer" of one expert.

Which tensors are allocated (the rules):

* one-dimensional tensors (norms, biases) and the routers (`ffn_gate_inp`, `exp_probs_b`): F32;
* the output head (`output.weight`, or `token_embd` when the head is tied to it): Q8_0, as
  llama.cpp's own mixes keep it (Q6_K, which falls back to Q8_0 on rows that are not a multiple
  of 256); it is where a quantisation error reaches the logits directly;
* a matrix whose rows are not a whole number of 32-value blocks: F16 (no candidate fits);
* everything else is allocated among the candidates (default `CANDIDATES`: Q4_0, Q4_1, Q5_0,
  Q5_1, Q8_0; F16 and F32 may be added, `gguf_budget.WRITABLE`): each attention and
  shared-expert / dense-MLP matrix, each layer's stacked gate, up and down experts (three
  choices per layer), and the token embedding when the head is not tied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from moecompress.errors import MoecompressError
from moecompress.export.gguf_budget import (
    CANDIDATES,
    GGUFBudget,
    bits_per_weight,
    fits,
    padded,
    tensor_bytes,
)
from moecompress.export.gguf_sensitivity import TypeErrors
from moecompress.io.gguf.types import KEEP_F32

T = GGMLQuantizationType
HEAD_TYPE = T.Q8_0


@dataclass(frozen=True)
class TensorChoice:
    """One tensor of the file: its fixed type, or the candidate types it is allocated among."""

    name: str
    shape: tuple[int, ...]
    fixed: GGMLQuantizationType | None  # None: allocated among `candidates`
    candidates: tuple[GGMLQuantizationType, ...] = ()

    @property
    def params(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count


def _base(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name


def tensor_choices(planned: Sequence[tuple[str, tuple[int, ...]]], tied: bool,
                   candidates: Sequence[GGMLQuantizationType] = CANDIDATES) -> list[TensorChoice]:
    """The rules of the module docstring applied to every (GGUF name, numpy shape) of the file."""
    out = []
    head = "token_embd.weight" if tied else "output.weight"
    for name, shape in planned:
        if len(shape) == 1 or _base(name) in KEEP_F32:
            out.append(TensorChoice(name, shape, T.F32))
        elif name == head:
            out.append(TensorChoice(name, shape, HEAD_TYPE if fits(shape, HEAD_TYPE) else T.F16))
        else:
            allowed = tuple(t for t in candidates if t in (T.F16, T.F32) or fits(shape, t))
            if not any(t not in (T.F16, T.F32) for t in allowed):
                out.append(TensorChoice(name, shape, T.F16))
            else:
                out.append(TensorChoice(name, shape, None, allowed))
    return out


@dataclass
class GGUFAllocation:
    """The chosen type of every tensor, with what it achieves against the budget."""

    types: dict[str, GGMLQuantizationType]
    bits_per_weight: float  # over the counted matrices (every tensor not fixed F32)
    allocated_bits_per_weight: float  # over the allocated tensors only
    tensor_bytes: int  # padded data bytes of all tensors
    objective: float  # total calibration error of the allocated tensors
    status: str
    seconds: float

    def counts(self) -> dict[str, int]:
        """Tensors per type."""
        out: dict[str, int] = {}
        for qtype in self.types.values():
            out[qtype.name] = out.get(qtype.name, 0) + 1
        return dict(sorted(out.items()))


def _size(choice: TensorChoice, qtype: GGMLQuantizationType, unit: str) -> float:
    if unit == "bits":
        return choice.params * bits_per_weight(qtype)
    return float(padded(tensor_bytes(choice.shape, qtype)))


def _narrowest(choice: TensorChoice, unit: str) -> float:
    return min(_size(choice, t, unit) for t in choice.candidates)


def budget_units(choices: Sequence[TensorChoice], budget: GGUFBudget, header_bytes: int, input_bytes: int
                 ) -> tuple[str, float, float]:
    """(unit, size allowed for the allocated tensors, total size of the fixed ones) with one-line range checks."""
    counted = [c for c in choices if c.fixed != T.F32]
    allocated = [c for c in choices if c.fixed is None]
    if not allocated:
        raise MoecompressError("this checkpoint has no matrix the allocation can choose a type for")
    if budget.bits is not None:
        unit = "bits"
        fixed = sum(_size(c, c.fixed, unit) for c in counted if c.fixed is not None)
        total = budget.bits * sum(c.params for c in counted)
        what, scale = f"--bits {budget.bits:g}", 1.0 / sum(c.params for c in counted)
        unit_name = "bits per weight"
    else:
        unit = "bytes"
        fixed = sum(_size(c, c.fixed, unit) for c in choices if c.fixed is not None) + header_bytes
        total = float(budget.size.resolve(input_bytes))  # type: ignore[union-attr]
        widest = fixed + sum(_size(c, T.F32, unit) for c in allocated)
        if total > widest:
            raise MoecompressError(f"--size {budget.describe()} ({total / 1e6:.2f} MB) is more than the file at f32 "
                                   f"({widest / 1e6:.2f} MB); use --type f32, or a smaller --size")
        what, scale, unit_name = f"--size {budget.describe()}", 1e-6, "MB"
    least = fixed + sum(_narrowest(c, unit) for c in allocated)
    if least > total * (1 + 1e-9):
        narrowest = min((t for c in allocated for t in c.candidates), key=bits_per_weight).name
        raise MoecompressError(f"{what} is below the smallest allocation: every allocated tensor at {narrowest} (and "
                               f"the fixed ones) needs {least * scale:.4g} {unit_name}; raise the budget")
    return unit, total - fixed, fixed


def allocate_types(choices: Sequence[TensorChoice], errors: TypeErrors, budget: GGUFBudget, header_bytes: int = 0,
                   input_bytes: int = 0, time_limit: float = 60.0) -> GGUFAllocation:
    """Solve the program of the module docstring; fixed tensors keep their types."""
    from moecompress.quant.allocate import AllocationRules, SolverOptions, allocate

    unit, allowed, _ = budget_units(choices, budget, header_bytes, input_bytes)
    allocated = [c for c in choices if c.fixed is None]
    costs, sizes, index_of = {}, {}, {}
    width = max(len(c.candidates) for c in allocated)
    for k, choice in enumerate(allocated):
        row_cost, row_size = [], []
        for j in range(width):
            # tensors with fewer candidates repeat their widest one (same cost and size: never a better pick)
            qtype = choice.candidates[min(j, len(choice.candidates) - 1)]
            row_cost.append(errors[choice.name][qtype.name])
            row_size.append(_size(choice, qtype, unit))
        costs[k] = torch.tensor([row_cost], dtype=torch.float64)  # (1, C)
        sizes[k] = torch.tensor([row_size], dtype=torch.float64)
        index_of[k] = choice
    solved = allocate(costs, sizes, list(range(1, width + 1)), allowed,
                      rules=AllocationRules(scope="global", require_top=0),
                      solving=SolverOptions(time_limit=time_limit))
    types = {c.name: c.fixed for c in choices if c.fixed is not None}
    for k, choice in index_of.items():
        types[choice.name] = choice.candidates[min(solved.widths[k][0] - 1, len(choice.candidates) - 1)]
    return summarise(choices, types, solved.objective, solved.status, solved.seconds)


def summarise(choices: Sequence[TensorChoice], types: dict[str, GGMLQuantizationType], objective: float = 0.0,
              status: str = "given", seconds: float = 0.0) -> GGUFAllocation:
    """The achieved bits per weight and data bytes of `types` over `choices`."""
    counted = [c for c in choices if c.fixed != T.F32]
    allocated = [c for c in choices if c.fixed is None]

    def average(group: list[TensorChoice]) -> float:
        params = sum(c.params for c in group)
        return sum(c.params * bits_per_weight(types[c.name]) for c in group) / max(params, 1)

    data = sum(padded(tensor_bytes(c.shape, types[c.name])) for c in choices)
    return GGUFAllocation(types=types, bits_per_weight=average(counted), allocated_bits_per_weight=average(allocated),
                          tensor_bytes=data, objective=objective, status=status, seconds=seconds)
