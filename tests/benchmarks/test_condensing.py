"""The `condensing` suite end to end on the miniature fixture: condense, prune at equal parameters, render."""

from __future__ import annotations

import math

import pytest

from benchmarks.harness.condensing import GridPoint, condensing, default_grid, render_condensing, resolve_loader
from benchmarks.harness.context import Fixture


def test_default_grid_of_a_two_layer_top2_model(mini_fixture: Fixture) -> None:
    # 2 MoE layers: 1 and ceil(2/2) = 1 layer; top-2: 1 and 2 experts; Qwen3-MoE has no prefix-only dense layers
    assert default_grid(mini_fixture) == [GridPoint("greedy", 1, 1), GridPoint("greedy", 1, 2)]


def test_loader_names_resolve() -> None:
    from transformers import AutoModelForCausalLM

    from moecompress.condense.apply import load_condensed

    assert resolve_loader("transformers.AutoModelForCausalLM.from_pretrained") == AutoModelForCausalLM.from_pretrained
    assert resolve_loader("moecompress.condense.apply.load_condensed") is load_condensed


def test_suite_condenses_prunes_at_equal_parameters_and_renders(mini_fixture: Fixture) -> None:
    grid = [dict(selection="greedy", num_layers=1, experts=1, layout="auto"),
            dict(selection="greedy", num_layers=1, experts=1, layout="moecompress")]
    data = condensing([mini_fixture], {"condense_grid": grid, "timing_repeats": 2})
    (entry,) = data["fixtures"]
    base = entry["unpruned"]
    stock, own = (pair["condensed"] for pair in entry["pairs"])

    # the same condensed model written in both layouts, each reopened with the loader it names
    assert stock["written_layout"] == "transformers" and stock["loaded_with"].startswith("transformers.")
    assert own["written_layout"] == "moecompress" and own["loaded_with"].startswith("moecompress.")
    assert stock["layers"] == own["layers"] and stock["kept_experts"] == own["kept_experts"]
    assert math.isclose(stock["mean_perplexity"], own["mean_perplexity"], rel_tol=1e-4)
    assert own["parameters"] > stock["parameters"]  # the moecompress layout keeps the condensed layer's router

    for pair in entry["pairs"]:
        cd, pr = pair["condensed"], pair["pruned"]
        assert cd["parameters"] < base["parameters"] and cd["bytes_on_disk"] < base["bytes_on_disk"]
        assert cd["search_seconds"] > 0 and cd["condense_seconds"] >= cd["search_seconds"]
        # the pruning partner has the feasible kept count closest in parameters, measured on the reloaded model
        counts = {int(k): v for k, v in entry["pruned_parameter_counts"].items()}
        assert counts[pr["kept_per_layer"]] == pr["parameters"]
        assert abs(pr["parameters"] - cd["parameters"]) == min(abs(v - cd["parameters"]) for v in counts.values())
        assert all(len(ids) == pr["kept_per_layer"] for ids in pr["keep"].values())
        for row in (cd, pr):
            assert all(math.isfinite(v) and v > 1 for v in row["perplexity"].values())
            assert row["forward_ms"] > 0
            assert row["speedup"] == pytest.approx(base["forward_ms"] / row["forward_ms"])

    lines = render_condensing(data)
    text = "\n".join(lines)
    assert "### mini" in text
    assert sum(line.startswith("| CD-MoE |") for line in lines) == 2
    assert sum(line.startswith("| ↳ reap pruning |") for line in lines) == 2
    check = next(line for line in lines if line.startswith("Check:"))
    wins = sum(p["condensed"]["mean_perplexity"] < p["pruned"]["mean_perplexity"] for p in entry["pairs"])
    assert f"lower mean perplexity in {wins} of 2 pairs" in check
    assert f"{stock['parameters']:,} vs {entry['pairs'][0]['pruned']['parameters']:,}" in text
