"""The cost suites (observer overhead, calibration memory, LP solve time) on tiny settings."""

from __future__ import annotations

import pytest

from benchmarks.harness.costs import (calibration_memory, lp_solve_time, observer_overhead, render_lp,
                                      render_memory, render_overhead)


def test_observer_overhead_measures_each_fixture(mini_fixture):
    data = observer_overhead([mini_fixture], {"overhead_repeats": 1, "overhead_batches": 2,
                                              "overhead_batch_size": 2, "overhead_synthetic": False})
    (row,) = data["rows"]
    assert row["model"] == "mini" and row["tokens"] == 2 * 2 * mini_fixture.protocol.seq_len
    assert row["overhead_whole_model"] == row["observed_forward_s"] / row["plain_forward_s"] > 0
    text = "\n".join(render_overhead(data))
    assert "| mini |" in text and "Check: whole-model overhead at most 1.3x for" in text


@pytest.mark.slow
def test_calibration_memory_reads_a_fresh_process_peak():
    data = calibration_memory([], {"memory_shape": {"layers": 2, "hidden": 64, "experts": 4, "width": 32,
                                                    "samples": 1}})
    assert data["checkpoint_bytes"] > 0 and data["peak_rss_bytes"] > data["baseline_rss_bytes"] > 0
    assert "| **" in "\n".join(render_memory(data))


def test_lp_solve_time_solves_small_programs_to_the_budget():
    data = lp_solve_time([], {"lp_shape": {"layers": 3, "experts": 16, "time_limit": 10.0}})
    assert {row["solver"] for row in data["rows"]} == {"highs", "cbc"} and len(data["rows"]) == 8
    assert all(row["status"] == "optimal" for row in data["rows"])
    assert {row["average_bits"] for row in data["rows"] if row["program"].startswith("global")} == {2.5}
    assert "Check: 8 of 8 solves optimal" in "\n".join(render_lp(data))
