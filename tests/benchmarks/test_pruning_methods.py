"""The pruning-method suites (every scorer + HEAPr, domain calibration, HEAPr memory) on the miniature fixture."""

from __future__ import annotations

import statistics as pystats

import pytest

from benchmarks.harness.heapr_memory import PASSES
from benchmarks.harness.pruning_methods import (domain_checks, domain_methods, expert_methods, heapr_memory,
                                                method_checks, neuron_methods, pruning_methods, render_domain_methods,
                                                render_heapr_memory, render_methods)


def test_every_scorer_is_benchmarked_against_the_baselines(mini_fixture):
    data = pruning_methods([mini_fixture], {"ratios": (0.5, 0.75), "seeds": (0, 1)})
    # 4 experts, top-2: removing 75% would leave 1 expert, which the router cannot use
    assert [(s["ratio"], "top_k=2" in s["reason"]) for s in data["skipped"]] == [(0.75, True)]
    rows = {row["method"]: row for row in data["rows"]}
    assert set(rows) == set(expert_methods()) | set(neuron_methods()) >= {"frequency", "naee", "heapr", "random"}
    unpruned = data["fixtures"][0]
    for row in rows.values():
        assert row["ratio"] == 0.5 and set(row["perplexity"]) == set(unpruned["perplexity"])
        assert row["x_unpruned"] == pytest.approx(row["mean_perplexity"] / unpruned["mean_perplexity"])
        assert row["parameters"] < unpruned["parameters"] and row["bytes_on_disk"] > 0
        assert row["calibration_s"] > 0 and row["scoring_s"] > 0
    assert all(row["kept_per_layer"] == 2 for row in rows.values() if row["granularity"] == "expert")
    random_row = rows["random"]
    assert [s["seed"] for s in random_row["per_seed"]] == [0, 1]
    seed_means = [s["mean_perplexity"] for s in random_row["per_seed"]]
    assert random_row["mean_perplexity"] == pytest.approx(pystats.fmean(seed_means))
    # HEAPr keeps every expert at half width (32 -> 16 neurons), in the stock layout, and removes
    # about as many parameters as dropping half the experts (which also drops router rows)
    heapr = rows["heapr"]
    assert (heapr["kept_per_layer"], heapr["kept_width"], heapr["format"]) == (4, 16, "transformers")
    assert heapr["parameters"] == pytest.approx(rows["frequency"]["parameters"], rel=0.02)
    assert "neuron_grad_proj" in heapr["statistics"] and heapr["calibration_mode"] == "whole-model"
    assert rows["frequency"]["statistics"] == ["count"]
    # methods reading the same statistics share one timed calibration pass
    assert rows["frequency"]["calibration_s"] == rows["random"]["calibration_s"] == rows["naee"]["calibration_s"]
    assert rows["naee"]["search"] == "exhaustive"  # C(4, 2) = 6 subsets

    text = "\n".join(render_methods(data))
    assert "### mini" in text and text.count("| 50% |") == len(rows)
    assert "- mini at 75%: not run" in text
    check = method_checks(data, "mini")
    best = min((row for name, row in rows.items() if name not in data["baselines"]), key=lambda r: r["mean_perplexity"])
    assert check["best"] == best["method"] and f"best method {best['method']} raises" in text
    worse = sorted(name for name, row in rows.items() if row["mean_perplexity"] > random_row["mean_perplexity"])
    assert sorted(name for _, name in check["worse_than_random"]) == worse


def _synthetic(rows: list[tuple[str, float, float]]) -> dict:
    """A pruning-methods payload with one fixture (unpruned mean 10) and rows (method, ratio, mean)."""
    info = {"fixture": "f", "perplexity": {"a": 10.0}, "mean_perplexity": 10.0, "parameters": 1e6, "num_experts": 8,
            "top_k": 2, "windows": {"a": 4}}
    return {"fixtures": [info], "baselines": ["random", "frequency", "soft_count"], "target_ratio": 0.5,
            "target_share": 0.5, "skipped": [],
            "rows": [{"fixture": "f", "method": m, "ratio": r, "mean_perplexity": v, "perplexity": {"a": v},
                      "x_unpruned": v / 10, "granularity": "expert", "kept_per_layer": 4, "parameters": 5e5,
                      "bytes_on_disk": 2e6, "calibration_s": 1.0, "scoring_s": 0.1, "seeds": [0], "search": "greedy",
                      "params": {}}
                     for m, r, v in rows]}


def test_method_target_compares_increases_over_unpruned():
    # best non-baseline (reap, +2) against frequency (+6): share 1/3, met; soft_count is a baseline
    data = _synthetic([("random", 0.5, 30.0), ("frequency", 0.5, 16.0), ("soft_count", 0.5, 10.5),
                       ("reap", 0.5, 12.0), ("ean", 0.5, 31.0), ("naee", 0.25, 40.0), ("random", 0.25, 20.0)])
    check = method_checks(data, "f")
    assert (check["best"], check["share"], check["met"]) == ("reap", pytest.approx(2 / 6), True)
    assert sorted(check["worse_than_random"]) == [(0.25, "naee"), (0.5, "ean")]
    text = "\n".join(render_methods(data))
    assert "share 0.33 (target at most 0.50: met)" in text and "ean at 50%" in text
    assert "on at least one fixture: met (1 of 1: f)" in text and "no method worse than random: not met" in text

    data = _synthetic([("random", 0.5, 30.0), ("frequency", 0.5, 16.0), ("reap", 0.5, 14.0)])
    check = method_checks(data, "f")
    assert (check["share"], check["met"], check["worse_than_random"]) == (pytest.approx(4 / 6), False, [])


def test_domain_methods_compare_own_domain_with_mixed_calibration(mini_fixture):
    data = domain_methods([mini_fixture], {})
    domains = mini_fixture.domains
    assert len(data["rows"]) == 2 * (1 + len(domains))
    for method in ("easy_ep", "premoe"):
        rows = [row for row in data["rows"] if row["method"] == method]
        assert [row["calibrated_on"] for row in rows] == ["all domains", *domains]
        mixed, base = rows[0]["perplexity"], rows[0]["unpruned"]
        expected = [row["calibrated_on"] for row in rows[1:] if abs(row["perplexity"][row["calibrated_on"]]
                    - base[row["calibrated_on"]]) < abs(mixed[row["calibrated_on"]] - base[row["calibrated_on"]])]
        assert domain_checks(rows) == expected
        assert len({tuple(row["perplexity"].values()) for row in rows}) > 1  # calibrations prune differently
    text = "\n".join(render_domain_methods(data))
    assert "### mini: easy_ep" in text and "### mini: premoe" in text
    premoe_wins = domain_checks([row for row in data["rows"] if row["method"] == "premoe"])
    assert (f"calibrating premoe on a domain keeps that domain's perplexity closer to unpruned than the all-domain "
            f"calibration for {len(premoe_wins)} of {len(domains)} domains") in text


def test_heapr_memory_measures_accumulators_and_peaks(mini_fixture):
    data = heapr_memory([mini_fixture], {"memory_rss": False})
    (row,) = data["rows"]
    # 4 experts x 32 neurons, two float64 sums per domain
    expected = 2 * len(mini_fixture.domains) * 4 * 32 * 8
    assert row["accumulator_bytes_per_layer"] == row["bound_bytes_per_layer"] == expected
    peaks = row["tensor_peak_bytes"]
    assert set(peaks) == set(PASSES) and all(value > 0 for value in peaks.values())
    assert peaks["heapr_observer"] > peaks["observer_forward"]  # the backward keeps activations alive
    extra = (peaks["heapr_observer"] - peaks["plain_backward"]) / row["moe_layers"]
    assert row["extra_tensor_bytes_per_layer"] == extra
    assert "extra_rss_bytes_per_layer" not in row
    text = "\n".join(render_heapr_memory(data))
    assert "| mini | 4 x 32 (32) | 2 |" in text and "accumulators equal the O(E x I) bound on 1 of 1" in text


@pytest.mark.slow
def test_heapr_memory_reads_fresh_process_peaks(mini_fixture):
    data = heapr_memory([mini_fixture], {"memory_rss": True})
    (row,) = data["rows"]
    assert set(row["rss"]) == set(PASSES)
    assert all(child["rss_peak"] >= child["rss_before"] > 0 for child in row["rss"].values())
    assert "not measured" not in "\n".join(render_heapr_memory(data))
