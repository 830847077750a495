"""`QuantPlan`: what every linear map of a model is quantised to, as plain versioned data.

Entries are keyed by module path in the loaded (transformers 5, in-memory) model:

* ``kind="linear"``: an `nn.Linear` inside a decoder layer (attention, shared experts, dense
  MLPs) or the output head;
* ``kind="expert"``: routed expert e of an MoE layer, key ``{experts_path}.{e}``; its gate, up
  and down projections share one spec and are written as the per-expert linears
  ``{key}.gate_proj``, ``{key}.up_proj`` and ``{key}.down_proj`` (GPTQModel's names for
  unfused experts).

A spec of None keeps the module in the original dtype. Routers, norms and embeddings are
never entries (always unquantised). The plan also exports GPTQModel's `dynamic` map (regex
keys, ``+:`` override / ``-:`` skip, first match wins) relative to a base spec.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal

from pydantic import BaseModel, ConfigDict

from moecompress.quant.spec import QuantSpec

PLAN_FILE = "quant_plan.json"
PLAN_VERSION = 1
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# the roles whose linear maps the plan can quantise, besides routed experts
LINEAR_ROLES = ("attention", "shared_experts", "dense_mlp", "lm_head")


class PlanEntry(BaseModel):
    """One quantisable unit: a linear map or a whole routed expert."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["linear", "expert"]
    role: str  # attention, shared_experts, dense_mlp, lm_head or routed_experts
    layer: int | None = None  # decoder layer index (None for the output head)
    expert: int | None = None
    params: int  # weight elements (biases excluded)
    spec: QuantSpec | None = None


class QuantPlan(BaseModel):
    """Per-module quantisation settings of one model, with the allocation that chose them."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = PLAN_VERSION
    method: str
    candidate_bits: list[int]
    budget: dict[str, float | str]  # {"bits": 2.5} or {"bytes": ...}; how the program was bounded
    entries: dict[str, PlanEntry]
    dropped: dict[int, list[int]] = {}  # joint compression: experts removed per MoE layer (original ids)
    allocation: dict[str, object] = {}  # solver, status, gap, seconds, objective

    # ---------------------------------------------------------------- queries
    def expert_bits(self) -> dict[int, list[int]]:
        """Width of every kept routed expert per layer (16 = unquantised)."""
        out: dict[int, dict[int, int]] = {}
        for entry in self.entries.values():
            if entry.kind == "expert":
                assert entry.layer is not None and entry.expert is not None
                out.setdefault(entry.layer, {})[entry.expert] = entry.spec.bits if entry.spec else 16
        return {layer: [bits[e] for e in sorted(bits)] for layer, bits in sorted(out.items())}

    def average_expert_bits(self) -> float:
        """Average nominal bits per routed-expert weight (kept experts; unquantised counts 16)."""
        total = weighted = 0
        for entry in self.entries.values():
            if entry.kind == "expert":
                total += entry.params
                weighted += entry.params * (entry.spec.bits if entry.spec else 16)
        return weighted / total if total else 0.0

    def base_spec(self) -> QuantSpec | None:
        """The most common spec (by parameter count): the GPTQ config's top-level settings."""
        counts: Counter[str] = Counter()
        specs: dict[str, QuantSpec] = {}
        for entry in self.entries.values():
            if entry.spec is not None:
                key = entry.spec.model_dump_json()
                counts[key] += entry.params
                specs[key] = entry.spec
        return specs[counts.most_common(1)[0][0]] if counts else None

    def gptq_modules(self) -> dict[str, QuantSpec | None]:
        """GPTQ module name -> spec (experts expanded into their three projections)."""
        out: dict[str, QuantSpec | None] = {}
        for key, entry in self.entries.items():
            if entry.kind == "expert":
                for proj in EXPERT_PROJECTIONS:
                    out[f"{key}.{proj}"] = entry.spec
            else:
                out[key] = entry.spec
        return out

    def gptqmodel_dynamic(self, base: QuantSpec) -> dict[str, dict[str, object]]:
        """GPTQModel's `dynamic` overrides: modules whose spec differs from `base`, grouped.

        Experts of one layer with the same spec share one regex; unquantised modules get a
        ``-:`` (skip) entry. Keys are anchored regexes over module names.
        """
        groups: dict[tuple[str, str], list[str]] = {}
        order: list[tuple[str, str]] = []
        for key, entry in self.entries.items():
            spec = entry.spec
            if spec == base:
                continue
            spec_key = "skip" if spec is None else spec.model_dump_json()
            if entry.kind == "expert":
                parent, _, index = key.rpartition(".")
                group_key = (f"expert:{parent}", spec_key)
                member = index
            else:
                group_key = (f"linear:{key}", spec_key)
                member = key
            if group_key not in groups:
                groups[group_key] = []
                order.append(group_key)
            groups[group_key].append(member)
        dynamic: dict[str, dict[str, object]] = {}
        for group_key in order:
            kind, spec_key = group_key
            members = groups[group_key]
            if kind.startswith("expert:"):
                parent = kind[len("expert:"):]
                ids = "|".join(members)
                pattern = rf"^{re.escape(parent)}\.({ids})\.({'|'.join(EXPERT_PROJECTIONS)})$"
            else:
                pattern = rf"^{re.escape(members[0])}$"
            if spec_key == "skip":
                dynamic["-:" + pattern] = {}
            else:
                spec = QuantSpec.model_validate_json(spec_key)
                dynamic["+:" + pattern] = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
                                           "desc_act": spec.act_order}
        return dynamic
