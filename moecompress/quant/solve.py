"""Quantise one map (or one routed expert) with the right method, and write the result back.

GPTQ needs enough calibration tokens: a map whose statistics saw fewer than `min_tokens`
tokens (a rarely routed expert) falls back to round-to-nearest, and the caller lists it in the
report. `spec.method == "rtn"` always uses round-to-nearest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moecompress.models.adapters.base import CanonicalExpert
from moecompress.quant.gptq import GPTQ
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
