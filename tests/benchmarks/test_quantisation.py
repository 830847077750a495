"""The `quantisation` suite end to end on the miniature fixture, and its building blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.harness.context import Fixture
from benchmarks.harness.quant_agreement import evaluation_windows, reference_pass, score
from benchmarks.harness.quant_peer import gptqmodel_missing, plan_mismatches
from benchmarks.harness.quantisation import fixture_checks, quantisation, random_widths, render_quantisation

# the smallest grid that still feeds every check: 3-bit uniform (with and without reordering), LP at 2.5,
# random, joint
SMALL_GRID = {"seeds": (0, 1), "uniform_bits": (3,), "ordering_bits": (3,), "lp_bits": (2.5,), "gptqmodel": False}


def test_suite_rows_tables_and_checks(mini_fixture: Fixture) -> None:
    data = quantisation([mini_fixture], SMALL_GRID)
    json.dumps(data)  # stored as raw JSON
    rows = {row["method"]: row for row in data["rows"]}
    assert list(rows) == ["unquantised", "rtn", "gptq", "gptq-no-reorder", "mc-moe", "gemq", "gemq-gptq", "random",
                          "joint"]
    base = rows["unquantised"]
    assert base["kl"] < 1e-4 and base["top1"] == 1.0  # the reference against itself (float16 storage)
    for method, row in rows.items():
        if method == "unquantised":
            continue
        assert row["bytes"] < base["bytes"], method
        assert row["kl"] > 0 and 0 < row["top1"] <= 1, method
        assert row["expert_effective_bits"] > row["expert_bits"], method  # scales, zeros and g_idx cost bits
        assert row["format"] == "gptq", method
        assert 0 <= row["size_model_bytes"] - row["bytes"] <= 0.05 * row["bytes"], method  # size model: generous
    assert rows["rtn"]["expert_bits"] == rows["gptq"]["expert_bits"] == rows["gptq-no-reorder"]["expert_bits"] == 3
    for method in ("mc-moe", "gemq", "gemq-gptq"):
        assert rows[method]["expert_bits"] <= 2.5 + 1e-9
    assert rows["random"]["expert_bits"] == pytest.approx(rows["mc-moe"]["expert_bits"])
    assert [entry["seed"] for entry in rows["random"]["per_seed"]] == [0, 1]
    assert rows["joint"]["bytes"] <= rows["mc-moe"]["bytes"]  # budget: the 2.5-bit checkpoint's size
    assert rows["joint"]["kept_per_layer"] <= rows["joint"]["experts_per_layer"]

    checks = fixture_checks(data["rows"], data["settings"])
    # random and 1.5x targets for both LPs, the default's KL target, GPTQ vs RTN candidates, column order, joint
    assert len(checks) == 8
    assert checks[4].startswith("the default method (gemq) at 2.5 bits: KL ")
    assert ("**met**" in checks[4]) == (rows["gemq"]["kl"] <= rows["gptq"]["kl"])
    assert checks[5].startswith("GEMQ at 2.5 bits with GPTQ candidates vs round-to-nearest candidates: KL ")
    assert checks[6].startswith("group-aware column order at 3 bits vs no reordering (uniform GPTQ): KL ")
    random_check = checks[0]
    assert ("**met**" in random_check) == (rows["mc-moe"]["mean_perplexity"] < rows["random"]["mean_perplexity"])
    lines = render_quantisation(data)
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # header + one line per row
    assert any(line.startswith("### mini") for line in lines)
    assert sum("**met**" in line or "**not met**" in line for line in lines) == 5


def test_random_widths_match_the_average(mini_fixture: Fixture) -> None:
    from moecompress.quant.targets import find_targets

    targets = find_targets(mini_fixture.model, mini_fixture.adapter)
    first, second = (random_widths(targets, mini_fixture.adapter, 2.5, seed) for seed in (0, 1))
    for widths in (first, second):
        flat = [w for layer in widths.values() for w in layer]
        assert set(flat) <= {2, 3} and sum(flat) / len(flat) == 2.5  # equal-sized experts: exactly half at 3 bits
    assert first != second


def test_scores_match_fixture_evaluate_and_gptq_folders_match_their_plan(mini_fixture: Fixture, tmp_path: Path
                                                                         ) -> None:
    import moecompress
    from moecompress.quant.plan import QuantPlan
    from moecompress.quant.run import parse_request, quantize_checkpoint

    request = parse_request(method="uniform", bits=3, settings={"method": "rtn"})
    quantize_checkpoint(mini_fixture.folder, tmp_path / "q", request, progress=False)
    model = moecompress.load(tmp_path / "q")
    protocol = mini_fixture.protocol
    reference = reference_pass(mini_fixture.model, evaluation_windows(mini_fixture), protocol.batch_size)
    ours, theirs = score(model, reference), mini_fixture.evaluate(model)
    for mine, expected in zip(ours["domains"], theirs["domains"]):
        assert mine["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert ours["kl"] > 0

    plan = QuantPlan.model_validate_json((tmp_path / "q" / "quant_plan.json").read_text())
    assert plan_mismatches(tmp_path / "q", plan) == []
    wrong = plan.model_copy(deep=True)
    key = next(k for k, e in wrong.entries.items() if e.kind == "expert")
    wrong.entries[key].spec = wrong.entries[key].spec.model_copy(update={"bits": 4})
    problems = plan_mismatches(tmp_path / "q", wrong)
    assert len(problems) == 3 and all(key in p and "at 4 bits" in p for p in problems)  # gate, up and down


@pytest.mark.slow
@pytest.mark.skipif(gptqmodel_missing() is not None, reason="gptqmodel is not installed")
def test_gptqmodel_peer_row(mini_fixture: Fixture) -> None:
    torch.manual_seed(0)
    options = {"uniform_bits": (4,), "lp_methods": (), "gptqmodel_bits": (4,), "joint": False}
    data = quantisation([mini_fixture], options)
    rows = {row["method"]: row for row in data["rows"]}
    peer = rows["gptqmodel"]
    assert "error" not in peer, peer.get("error")
    assert peer["expert_bits"] == 4 and peer["seconds"] > 0 and peer["import_seconds"] > 0
    assert peer["loader_check"]["top1"] > 0.9  # GPTQModel's loader and ours read the same weights
    assert peer["mean_perplexity"] == pytest.approx(rows["gptq"]["mean_perplexity"], rel=0.2)
    assert any("GPTQModel at 4 bits" in check for check in fixture_checks(data["rows"], data["settings"]))


@pytest.mark.slow
@pytest.mark.skipif(gptqmodel_missing() is not None, reason="gptqmodel is not installed")
def test_gptqmodel_failures_are_recorded_with_their_reason(tmp_path: Path) -> None:
    from benchmarks.harness.quant_peer import run_worker

    torch.save(torch.zeros((1, 8), dtype=torch.long), tmp_path / "ids.pt")
    run = {"name": "broken", "source": str(tmp_path / "no-such-model"), "output": str(tmp_path / "out"),
           "config": {"bits": 4, "group_size": 128}, "calibration": str(tmp_path / "ids.pt"), "batch_size": 1,
           "dtype": "float32", "check_ids": None, "check_out": None}
    results = run_worker([run], tmp_path, threads=1, timeout=300)
    outcome = results["runs"]["broken"]
    assert outcome["ok"] is False and outcome["error"]
    assert results["import_seconds"] > 0  # the worker itself ran; only the run failed


def test_the_suite_checks_the_default_method() -> None:
    from benchmarks.harness.quantisation import DEFAULT_METHOD
    from moecompress.quant.run import QuantizeRequest

    assert QuantizeRequest(bits=2.5).method == DEFAULT_METHOD
