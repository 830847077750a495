"""Quantise one map (or one routed expert) with the right method, and write the result back.

GPTQ needs enough calibration tokens: a map whose statistics saw fewer than `min_tokens`
tokens (a rarely routed expert) falls back to round-to-nearest, and the caller lists it in the
report. `spec.method == "rtn"` always uses round-to-nearest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moecompress.models.adapters.base import CanonicalExpert
from moecompress.quant.gptq import GPTQ, gptq_batched
from moecompress.quant.layout import select_rows
from moecompress.quant.rtn import quantize_rtn
from moecompress.quant.spec import QuantizedWeight, QuantSpec


@dataclass
class Solved:
    """A quantised weight and how it was obtained."""

    weight: QuantizedWeight
    method: str  # "gptq", "rtn" (asked for) or "rtn-fallback" (too few tokens)
    damp: float | None = None


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, stats: GPTQ | None, min_tokens: int) -> Solved:
    """Quantise weight (out, in) per `spec`, with GPTQ when `stats` saw at least `min_tokens` tokens."""
    if spec.method == "rtn":
        return Solved(quantize_rtn(weight, spec), "rtn")
    if stats is None or stats.tokens < max(min_tokens, 1):
        return Solved(quantize_rtn(weight, spec), "rtn-fallback")
    result = stats.quantize(weight, spec)
    return Solved(result.weight, "gptq", result.damp)


def quantize_expert(expert: CanonicalExpert, spec: QuantSpec, inputs: GPTQ | None, activations: GPTQ | None,
                    min_tokens: int) -> dict[str, Solved]:
    """Quantise a routed expert's projections: gate/up with input statistics, down with activation ones."""
    solved: dict[str, Solved] = {}
    if expert.gate is not None:
        solved["gate_proj"] = quantize_weight(expert.gate, spec, inputs, min_tokens)
    solved["up_proj"] = quantize_weight(expert.up, spec, inputs, min_tokens)
    solved["down_proj"] = quantize_weight(expert.down, spec, activations, min_tokens)
    return solved


SOLVE_MEMORY = 256 * 2**20  # bytes of float32 solver state (weights, Hessians, factors) per batched GPTQ solve


def quantize_experts(experts: Mapping[int, CanonicalExpert], specs: Mapping[int, QuantSpec],
                     inputs: Mapping[int, GPTQ], activations: Mapping[int, GPTQ], min_tokens: int,
                     solve_memory: int = SOLVE_MEMORY) -> dict[int, dict[str, Solved]]:
    """`quantize_expert` for several experts of one layer, with their GPTQ solves batched.

    Experts that share a spec and have enough tokens are solved together (`gptq_batched`):
    gate and up share the input statistics, and GPTQ treats rows independently, so they are
    solved as one (2I, H) map; down with the activation statistics. The results equal
    solving each expert alone. The rest (RTN, too few tokens) go through `quantize_expert`.
    """
    solved: dict[int, dict[str, Solved]] = {}
    groups: dict[str, list[int]] = {}
    for e, expert in experts.items():
        spec, stats = specs[e], inputs.get(e)
        if spec.method == "gptq" and stats is not None and stats.tokens >= max(min_tokens, 1):
            groups.setdefault(spec.model_dump_json(), []).append(e)
        else:
            solved[e] = quantize_expert(expert, spec, stats, activations.get(e), min_tokens)
    for members in groups.values():
        spec = specs[members[0]]
        probe = experts[members[0]]
        width, hidden = probe.up.shape
        maps = 2 if probe.gate is not None else 1
        per_expert = 4 * (maps * width * hidden + 2 * hidden * hidden + hidden * width + 2 * width * width)
        size = max(1, solve_memory // per_expert)
        for start in range(0, len(members), size):
            batch = members[start : start + size]
            solved.update(_solve_batch({e: experts[e] for e in batch}, spec, inputs, activations))
    return {e: solved[e] for e in experts}


def _solve_batch(experts: Mapping[int, CanonicalExpert], spec: QuantSpec, inputs: Mapping[int, GPTQ],
                 activations: Mapping[int, GPTQ]) -> dict[int, dict[str, Solved]]:
    """Batched GPTQ of experts with one spec and shape: [gate; up] (N, 2I or I, H), then down (N, H, I)."""
    ids = list(experts)
    has_gate = experts[ids[0]].gate is not None
    width = experts[ids[0]].up.shape[0]
    first = torch.stack([torch.cat([experts[e].gate, experts[e].up]) if has_gate else experts[e].up
                         for e in ids]).float()  # (N, 2I, H)
    first_results = gptq_batched(first, torch.stack([inputs[e].hessian for e in ids]), spec)
    del first
    down = torch.stack([experts[e].down for e in ids]).float()  # (N, H, I)
    down_results = gptq_batched(down, torch.stack([activations[e].hessian for e in ids]), spec)
    out: dict[int, dict[str, Solved]] = {}
    for e, fused, second in zip(ids, first_results, down_results):
        result: dict[str, Solved] = {}
        if has_gate:
            result["gate_proj"] = Solved(select_rows(fused.weight, torch.arange(width)), "gptq", fused.damp)
            result["up_proj"] = Solved(select_rows(fused.weight, torch.arange(width, 2 * width)), "gptq", fused.damp)
        else:
            result["up_proj"] = Solved(fused.weight, "gptq", fused.damp)
        result["down_proj"] = Solved(second.weight, "gptq", second.damp)
        out[e] = result
    return out


def fp16_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A quantised map's bias as the GPTQ format stores it (float16), in the bias's dtype."""
    return None if bias is None else bias.detach().to(torch.float16).to(bias.dtype)


def dequantized_expert(expert: CanonicalExpert, solved: dict[str, Solved]) -> CanonicalExpert:
    """A copy of `expert` with its quantised projections dequantised (for error measurements)."""
    dtype = expert.up.dtype
    return dataclasses.replace(
        expert,
        gate=solved["gate_proj"].weight.dequantize(dtype) if "gate_proj" in solved else expert.gate,
        up=solved["up_proj"].weight.dequantize(dtype),
        down=solved["down_proj"].weight.dequantize(dtype),
        gate_bias=fp16_bias(expert.gate_bias),
        up_bias=fp16_bias(expert.up_bias),
        down_bias=fp16_bias(expert.down_bias),
    )


@torch.no_grad()
def write_expert(expert: CanonicalExpert, solved: dict[str, Solved]) -> None:
    """Write dequantised weights (and fp16-rounded biases) into the expert's views (the fused params)."""
    views = {"gate_proj": (expert.gate, expert.gate_bias), "up_proj": (expert.up, expert.up_bias),
             "down_proj": (expert.down, expert.down_bias)}
    for proj, result in solved.items():
        weight, bias = views[proj]
        assert weight is not None
        weight.copy_(result.weight.dequantize(weight.dtype))
        if bias is not None:
            bias.copy_(fp16_bias(bias))


@torch.no_grad()
def write_linear(module: torch.nn.Linear, solved: Solved) -> None:
    """Write a dequantised weight (and fp16-rounded bias) into an `nn.Linear`."""
    module.weight.copy_(solved.weight.dequantize(module.weight.dtype))
    if module.bias is not None:
        module.bias.copy_(fp16_bias(module.bias))
