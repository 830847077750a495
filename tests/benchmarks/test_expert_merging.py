"""The expert-merging suite's checks and table, on synthetic rows (the suite itself runs in `benchmarks.run`)."""

from __future__ import annotations

from benchmarks.harness.expert_merging import merging_checks, render_expert_merging, shared_statistics


def _payload(rows: list[tuple[str, float, str, float]]) -> dict:
    """One fixture (unpruned mean 10) and rows (method, ratio, merge, mean perplexity)."""
    return {"fixtures": [{"fixture": "f", "mean_perplexity": 10.0, "perplexity": {"a": 10.0}, "windows": {"a": 4}}],
            "ratios": [0.25, 0.5], "methods": ["frequency", "reap"], "merges": ["none", "centroid", "cluster"],
            "target_ratio": 0.5, "target_share": 0.5, "skipped": [],
            "rows": [{"fixture": "f", "method": m, "ratio": r, "merge": g, "mean_perplexity": p, "seconds": 1.0}
                     for m, r, g, p in rows]}


def test_checks_count_wins_against_dropping_and_the_share_of_frequency() -> None:
    data = _payload([("frequency", 0.5, "none", 20.0), ("frequency", 0.5, "centroid", 18.0),
                     ("frequency", 0.5, "cluster", 25.0), ("reap", 0.5, "none", 16.0),
                     ("reap", 0.5, "centroid", 17.0), ("reap", 0.25, "none", 12.0), ("reap", 0.25, "cluster", 11.0)])
    check = merging_checks(data, "f")
    assert check["wins"] == {"centroid": {"wins": 1, "compared": 2}, "cluster": {"wins": 1, "compared": 2}}
    assert check["best"]["method"] == "reap" and check["best"]["merge"] == "none"
    assert check["share"] == (16.0 - 10.0) / (20.0 - 10.0)
    text = "\n".join(render_expert_merging(data))
    assert "| method | 25% none | 25% cluster | 50% none | 50% centroid | 50% cluster |" in text  # columns with runs
    assert "| frequency | - | - | 20.00 | **18.00** | 25.00 |" in text
    assert "| reap | 12.00 | **11.00** | **16.00** | 17.00 | - |" in text
    assert "centroid merging lowers mean perplexity against dropping in 1 of 2" in text
    assert "0.60 (target at most 0.50: not met)" in text


def test_one_statistics_set_serves_every_method_and_merging() -> None:
    names = shared_statistics(["frequency", "reap", "easy_ep"])
    assert {"count", "gated_out_norm", "easy_ep", "mean_output"} <= set(names) and "max_act" not in names
