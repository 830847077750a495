"""QuantPlan queries, GPTQModel's dynamic map, and budget parsing."""

from __future__ import annotations

import re

import pytest

from moecompress.errors import MoecompressError
from moecompress.quant.budget import parse_size
from moecompress.quant.plan import PlanEntry, QuantPlan
from moecompress.quant.spec import QuantSpec

FOUR = QuantSpec(bits=4, group_size=128)
TWO = QuantSpec(bits=2, group_size=128)
THREE = QuantSpec(bits=3, group_size=128)


def sample_plan() -> QuantPlan:
    entries = {
        "model.layers.0.self_attn.q_proj": PlanEntry(kind="linear", role="attention", layer=0, params=100, spec=FOUR),
        "model.layers.0.self_attn.o_proj": PlanEntry(kind="linear", role="attention", layer=0, params=100, spec=None),
        "lm_head": PlanEntry(kind="linear", role="lm_head", params=50, spec=None),
    }
    widths = {0: [TWO, FOUR, TWO, THREE, None] + [TWO] * 7, 1: [FOUR] * 12}
    for layer, specs in widths.items():
        for e, spec in enumerate(specs):
            entries[f"model.layers.{layer}.mlp.experts.{e}"] = PlanEntry(kind="expert", role="routed_experts",
                                                                         layer=layer, expert=e, params=10, spec=spec)
    return QuantPlan(method="test", candidate_bits=[2, 3, 4], budget={"bits": 3.0}, entries=entries)


def resolve(dynamic: dict, name: str, base: QuantSpec) -> object:
    """GPTQModel's rule: the first matching key wins; '-:' skips; no match = base settings."""
    for key, override in dynamic.items():
        if re.match(key[2:], name):
            return None if key.startswith("-:") else override["bits"]
    return base.bits


def test_plan_queries() -> None:
    plan = sample_plan()
    assert plan.expert_bits()[0][:5] == [2, 4, 2, 3, 16]
    assert plan.average_expert_bits() == pytest.approx((2 * 9 + 4 * 13 + 3 + 16) / 24)
    assert plan.base_spec() == FOUR  # 4-bit holds the most parameters
    modules = plan.gptq_modules()
    assert modules["model.layers.0.mlp.experts.3.down_proj"] == THREE
    assert len([m for m in modules if ".experts." in m]) == 24 * 3


def test_dynamic_map_gives_every_module_its_planned_bits() -> None:
    plan = sample_plan()
    base = plan.base_spec()
    dynamic = plan.gptqmodel_dynamic(base)
    assert len(dynamic) <= 6  # grouped per (layer, spec), not one key per expert
    for name, spec in plan.gptq_modules().items():
        assert resolve(dynamic, name, base) == (None if spec is None else spec.bits), name
    # expert ids are matched whole: expert 1 (4-bit) is not captured by the 2-bit group holding 10 and 11
    assert resolve(dynamic, "model.layers.0.mlp.experts.1.up_proj", base) == 4
    assert resolve(dynamic, "model.layers.0.mlp.experts.11.up_proj", base) == 2
    assert plan.model_validate_json(plan.model_dump_json()) == plan


@pytest.mark.parametrize("text,expected", [("4GB", 4 * 10**9), ("3.5GiB", int(3.5 * 2**30)), ("800 MB", 8 * 10**8),
                                           ("123", 123)])
def test_parse_size_bytes(text: str, expected: int) -> None:
    assert parse_size(text).bytes == expected


def test_parse_size_percent_and_errors() -> None:
    assert parse_size("40%").resolve(1000) == 400
    for bad in ("0%", "150%", "four GB", "4XB"):
        with pytest.raises(MoecompressError):
            parse_size(bad)
