"""User settings for everything that is not a routed expert, and building the plan from them.

Defaults (docs/methods/quantisation.md): attention, shared experts and dense MLPs at 4 bits; routers, norms and
embeddings unquantised; the output head unquantised (16). Each role's bits are overridable
(16 keeps the role in the original dtype). Group size, symmetry, act-order, damping and the
method (GPTQ or RTN) apply to every quantised map, routed experts included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter
from moecompress.quant.plan import PlanEntry, QuantPlan
from moecompress.quant.spec import SUPPORTED_BITS, UNQUANTIZED, QuantSpec
from moecompress.quant.targets import ModelTargets, expert_params


class QuantSettings(BaseModel):
    """Bits per role (16 = unquantised) and the grid / solver settings shared by all maps."""

    model_config = ConfigDict(extra="forbid")

    attention: int = 4
    shared_experts: int = 4
    dense_mlp: int = 4
    lm_head: int = UNQUANTIZED
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    group_aware: bool = True
    damp: float = 0.01
    method: Literal["gptq", "rtn"] = "gptq"

    @field_validator("attention", "shared_experts", "dense_mlp", "lm_head")
    @classmethod
    def _check_bits(cls, value: int) -> int:
        if value not in SUPPORTED_BITS + (UNQUANTIZED,):
            raise ValueError(f"bits must be one of {SUPPORTED_BITS} or {UNQUANTIZED} (unquantised), got {value}")
        return value

    def spec(self, bits: int) -> QuantSpec | None:
        """The spec for `bits` with these settings (None for 16 = unquantised)."""
        if bits == UNQUANTIZED:
            return None
        return QuantSpec(bits=bits, group_size=self.group_size, sym=self.sym, act_order=self.act_order,
                         group_aware=self.group_aware,
                         damp=self.damp, method=self.method)

    def role_bits(self, role: str) -> int:
        """Bits of a non-expert role."""
        return int(getattr(self, role))


@dataclass
class PlanHeader:
    """What a plan records about how it was chosen (the `QuantPlan` fields besides its entries)."""

    method: str  # uniform, mc-moe, gemq, or joint (...)
    candidate_bits: list[int]
    budget: dict[str, float | str]  # {"bits": 2.5} or {"bytes": ...}
    allocation: dict[str, object] | None = None  # solver, status, gap, seconds, objective
    dropped: dict[int, list[int]] | None = None  # joint compression: experts removed per MoE layer


def make_plan(targets: ModelTargets, adapter: MoEAdapter, expert_bits: dict[int, list[int]],
              settings: QuantSettings, header: PlanHeader) -> QuantPlan:
    """The plan for a model: routed experts at `expert_bits[layer][e]`, other roles per `settings`."""
    entries: dict[str, PlanEntry] = {}
    for index in range(targets.num_layers):
        for target in targets.linears[index]:
            entries[target.name] = PlanEntry(kind="linear", role=target.role, layer=index, params=target.params,
                                             spec=settings.spec(settings.role_bits(target.role)))
        moe = targets.moe.get(index)
        if moe is None:
            continue
        widths = expert_bits[index]
        if len(widths) != moe.num_experts:
            raise ValueError(f"layer {index}: {len(widths)} widths for {moe.num_experts} experts")
        params = expert_params(adapter, moe)
        for e, bits in enumerate(widths):
            entries[f"{moe.experts_path}.{e}"] = PlanEntry(kind="expert", role="routed_experts", layer=index,
                                                           expert=e, params=params, spec=settings.spec(bits))
    if targets.head is not None:
        entries[targets.head.name] = PlanEntry(kind="linear", role="lm_head", params=targets.head.params,
                                               spec=settings.spec(settings.lm_head))
    return QuantPlan(method=header.method, candidate_bits=list(header.candidate_bits), budget=header.budget,
                     entries=entries, dropped=header.dropped or {}, allocation=header.allocation or {})


def parse_candidates(text: str | None) -> list[int] | None:
    """'2,3,4' -> [2, 3, 4]; a one-line error for anything else."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MoecompressError(f"--candidates {text!r} must be comma-separated integers, e.g. 2,3,4") from None


def parse_expert_memory(text: str) -> int:
    """'1GiB' -> bytes (an absolute size; percentages are refused)."""
    from moecompress.quant.budget import parse_size

    size = parse_size(text)
    if size.bytes is None:
        raise MoecompressError(f"--expert-memory {text!r} must be an amount such as 1GiB, not a percentage")
    return size.bytes


# QuantSettings field -> the option (CLI flag / recipe key) that sets it
SETTING_OPTIONS = {"attention": "attention_bits", "shared_experts": "shared_bits", "dense_mlp": "dense_bits",
                   "lm_head": "lm_head_bits", "group_size": "group_size", "act_order": "act_order",
                   "group_aware": "group_aware", "damp": "damp"}


def settings_from_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The QuantSettings values of the shared role / grid options, read by their option names from `options`
    (a command's arguments or a recipe step's keys: attention_bits, shared_bits, dense_bits, lm_head_bits,
    group_size, asym, act_order, group_aware, damp, rtn)."""
    values = {field: options[option] for field, option in SETTING_OPTIONS.items()}
    values.update(sym=not options["asym"], method="rtn" if options["rtn"] else "gptq")
    return values
