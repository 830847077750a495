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
    assert data["peak_anon_bytes"] >= data["baseline_anon_bytes"] > 0 and data["peak_file_bytes"] > 0
    assert data["load_anon_bytes"] > 0
    text = "\n".join(render_memory(data))
    assert "| **" in text and "| anonymous |" in text and "| file-backed |" in text
    assert "only opens the checkpoint for the layer engine" in text


def test_rss_sampler_sees_an_anonymous_allocation_and_a_mapped_file(tmp_path):
    """A 64 MiB buffer raises the anonymous peak; reading a 32 MiB memory-mapped file raises the file-backed one."""
    import mmap

    from benchmarks.harness.peak_memory import RssSampler, rss_supported

    if not rss_supported():
        pytest.skip("needs Linux /proc/self/status")
    path = tmp_path / "blob"
    path.write_bytes(b"\1" * (32 * 2**20))
    sampler = RssSampler().start()
    start = dict(sampler.peaks)
    buffer = bytearray(b"\2" * (64 * 2**20))
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == len(mapped) // 4096  # touch every page
        sampler.sample()
    peaks = sampler.stop()
    del buffer
    assert peaks["anon"] - start["RssAnon"] >= 60 * 2**20
    assert peaks["file"] - start["RssFile"] >= 30 * 2**20


def test_memory_table_without_the_split_keeps_the_old_note():
    data = {"shape": {"layers": 8, "hidden": 1024, "experts": 32, "width": 512, "samples": 2},
            "checkpoint_bytes": 2**30, "peak_rss_bytes": 2**31, "baseline_rss_bytes": 2**28,
            "peak_above_baseline_over_checkpoint": 1.75, "calibrate_seconds": 10.0}
    text = "\n".join(render_memory(data))
    assert "**1.75x**" in text and "Known gap: the whole checkpoint" in text and "anonymous" not in text


def test_lp_solve_time_solves_small_programs_to_the_budget():
    data = lp_solve_time([], {"lp_shape": {"layers": 3, "experts": 16, "time_limit": 10.0}})
    assert {row["solver"] for row in data["rows"]} == {"highs", "cbc"} and len(data["rows"]) == 8
    assert all(row["status"] == "optimal" for row in data["rows"])
    assert {row["average_bits"] for row in data["rows"] if row["program"].startswith("global")} == {2.5}
    assert "Check: 8 of 8 solves optimal" in "\n".join(render_lp(data))
