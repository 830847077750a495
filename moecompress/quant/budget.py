"""Budgets for the bit allocator: average bits over routed-expert weights, or bytes on disk.

* ``--bits 2.5``: sum_e params_e * bits_e <= 2.5 * sum_e params_e over routed experts (nominal
  bits; the manifest also reports the effective bits with scales, zeros and g_idx counted).
* ``--size 4GB`` / ``--size 40%``: bytes of the GPTQ checkpoint. Everything that is not a
  routed expert has a fixed size under its role settings (packed when quantised, original
  dtype otherwise); the routed experts share what is left, each costing its packed bytes
  (codes + fp16 scales + zeros + g_idx + fp16 biases) at the chosen width. A percentage is of
  the input checkpoint's safetensors bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter
from moecompress.quant.settings import QuantSettings
from moecompress.quant.spec import UNQUANTIZED, QuantSpec
from moecompress.quant.targets import ModelTargets, expert_params

# bytes a tensor costs in a safetensors JSON header besides its name (dtype, shape, offsets, quotes)
HEADER_BYTES_PER_TENSOR = 80
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class SizeBudget:
    """A size target: absolute bytes, or a fraction of the input checkpoint's bytes."""

    bytes: int | None = None
    fraction: float | None = None

    def resolve(self, input_bytes: int) -> int:
        """Bytes allowed for a checkpoint of `input_bytes`."""
        return self.bytes if self.bytes is not None else int(round(self.fraction * input_bytes))  # type: ignore[operator]

    def describe(self) -> str:
        return f"{self.fraction:.1%} of the input" if self.fraction is not None else f"{self.bytes:,} bytes"


def parse_size(text: str) -> SizeBudget:
    """'4GB', '3.5GiB', '800MB', '40%' -> SizeBudget; a one-line error otherwise."""
    value = text.strip().replace(" ", "")
    if value.endswith("%"):
        try:
            fraction = float(value[:-1]) / 100
        except ValueError:
            fraction = -1.0
        if not 0 < fraction <= 1:
            raise MoecompressError(f"--size {text!r}: a percentage must be in (0, 100]")
        return SizeBudget(fraction=fraction)
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)([A-Za-z]*)", value)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise MoecompressError(f"--size {text!r} is not a size; use e.g. 4GB, 3.5GiB, 800MB or 40%")
    return SizeBudget(bytes=int(float(match.group(1)) * _UNITS[unit]))


def header_bytes(module_name: str, spec: QuantSpec | None, bias: bool) -> int:
    """Safetensors header bytes of one linear map's tensors (matters for small maps)."""
    leaves = list(GPTQ_TENSORS if spec is not None else ("weight",)) + (["bias"] if bias else [])
    return sum(HEADER_BYTES_PER_TENSOR + len(module_name) + 1 + len(leaf) for leaf in leaves)


def packed_bytes(spec: QuantSpec | None, out_features: int, in_features: int, element_size: int,
                 bias: bool = False, name: str | None = None) -> float:
    """Bytes of one linear map on disk: packed when `spec` is set, else in the original dtype.

    With `name`, the map's safetensors header entries are counted too.
    """
    header = 0 if name is None else header_bytes(name, spec, bias)
    if spec is None:
        return (out_features * in_features + (out_features if bias else 0)) * element_size + header
    data = spec.storage_bits(out_features, in_features) * out_features * in_features / 8
    return data + (2 * out_features if bias else 0) + header


def expert_shapes(adapter: MoEAdapter, targets: ModelTargets, layer: int) -> list[tuple[str, int, int, bool]]:
    """(projection name, out, in, has_bias) of each projection of one routed expert of `layer`."""
    expert = adapter.expert_weights(targets.moe[layer], 0)
    pairs = [("gate_proj", expert.gate, expert.gate_bias), ("up_proj", expert.up, expert.up_bias),
             ("down_proj", expert.down, expert.down_bias)]
    return [(proj, w.shape[0], w.shape[1], b is not None) for proj, w, b in pairs if w is not None]


def expert_sizes(adapter: MoEAdapter, targets: ModelTargets, widths: list[int], unit: str, settings: QuantSettings,
                 element_size: int) -> dict[int, torch.Tensor]:
    """Per MoE layer (E, C): size of each expert at each width (0 = dropped), in bits x params or bytes."""
    out = {}
    for layer, ref in targets.moe.items():
        params = expert_params(adapter, ref)
        shapes = expert_shapes(adapter, targets, layer)
        prefix = f"{ref.experts_path}.{ref.num_experts - 1}."  # the longest expert id, for header sizes
        row = []
        for width in widths:
            if width == 0:
                row.append(0.0)
            elif unit == "bits":
                row.append(float(params * width))
            else:
                spec = settings.spec(width) if width != UNQUANTIZED else None
                row.append(sum(packed_bytes(spec, o, i, element_size, b, prefix + proj) for proj, o, i, b in shapes))
        out[layer] = torch.tensor(row, dtype=torch.float64).expand(ref.num_experts, -1).clone()
    return out


def fixed_bytes(model: nn.Module, adapter: MoEAdapter, targets: ModelTargets, settings: QuantSettings,
                element_size: int) -> float:
    """Bytes of everything but the routed experts under `settings` (quantised linears packed)."""
    from moecompress.quant.fake_quant import tied_keys
    from moecompress.sizes import tensor_roles

    roles = tensor_roles(model, adapter)
    tied = tied_keys(model)
    linears = {t.name: t for ts in targets.linears.values() for t in ts}
    if targets.head is not None:
        linears[targets.head.name] = targets.head
    total = 0.0
    seen_linear = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if roles.get(name) == "routed_experts" or name in tied:
            continue
        module_name, _, leaf = name.rpartition(".")
        target = linears.get(module_name)
        if target is not None and leaf in ("weight", "bias"):
            spec = settings.spec(settings.role_bits(target.role))
            if spec is not None:
                if module_name not in seen_linear:
                    seen_linear.add(module_name)
                    module = target.module
                    total += packed_bytes(spec, module.out_features, module.in_features, element_size,
                                          module.bias is not None, module_name)
                continue
        size = element_size if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size + HEADER_BYTES_PER_TENSOR + len(name)
    return total
