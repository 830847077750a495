"""The `packed-loading` suite on the miniature fixture (the real-shape part off), and its report."""

from __future__ import annotations

import json

import pytest

from benchmarks.harness.context import Fixture
from benchmarks.harness.packed_loading import checks, packed_loading, render_packed_loading

# uniform 4-bit GPTQ (the suite's default is GEMQ at 2.5 bits) and a short decode keep the run small
OPTIONS = {"method": "uniform", "bits": 4, "decode_tokens": 4, "prompt_tokens": 8, "scale_layers": 0}


@pytest.mark.slow
def test_suite_measures_both_modes_and_renders(mini_fixture: Fixture) -> None:
    data = packed_loading([mini_fixture], OPTIONS)
    json.dumps(data)  # stored as raw JSON
    (row,) = data["rows"]
    assert data["scale"] is None
    dense, packed = row["modes"]["load"], row["modes"]["use"]
    assert row["max_logit_difference"] < 1e-4  # the two paths compute the same model
    assert abs(packed["kl"] - dense["kl"]) < 1e-6
    assert packed["top1"] == dense["top1"]
    for mode in (dense, packed):
        assert mode["live_peak_bytes"] > 0 and mode["decoded"] == OPTIONS["decode_tokens"]
        assert mode["forward_tokens_per_second"] > 0 and mode["load_seconds"] > 0
    assert packed["live_peak_bytes"] < dense["live_peak_bytes"]  # the packed path never holds every dense weight
    text = "\n".join(render_packed_loading(data))
    assert "| mini |" in text and "| use |" in text and "| load |" in text
    (line,) = checks(row)
    assert line.startswith("- mini: packed peak") and ("met" in line or "missed" in line)
