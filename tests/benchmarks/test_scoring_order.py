"""The scoring-order suite's checks and table, on synthetic rows (the suite itself runs in `benchmarks.run`)."""

from __future__ import annotations

import pytest

from benchmarks.harness.scoring_order import order_checks, render_scoring_order, sequential_methods


def _payload(rows: list[tuple[str, float, str, str, float, list[int]]]) -> dict:
    """One fixture (unpruned mean 10); rows (method, ratio, scoring, detection rule or "" for no protection, mean
    perplexity, layer-1 experts kept)."""
    info = {"fixture": "f", "perplexity": {"a": 10.0}, "mean_perplexity": 10.0, "windows": {"a": 4}}
    return {"fixtures": [info], "ratios": [0.25, 0.5], "methods": ["frequency", "reap"], "protection_ratio": 0.5,
            "target_share": 0.5, "skipped": [],
            "rows": [{"fixture": "f", "method": m, "ratio": r, "scoring": s, "protect": bool(p),
                      "rule": p or None, "mean_perplexity": v,
                      "perplexity": {"a": v}, "x_unpruned": v / 10, "kept_per_layer": 4, "protected": int(bool(p)),
                      "keep": {1: keep}, "seconds": 1.0, "windows": {"a": 4}}
                     for m, r, s, p, v, keep in rows]}


def test_checks_count_sequential_wins_protection_changes_and_the_best_share() -> None:
    data = _payload([
        ("frequency", 0.25, "one-pass", "", 11.0, [0, 1]), ("frequency", 0.25, "sequential", "", 11.5, [0, 1]),
        ("frequency", 0.5, "one-pass", "", 18.0, [0, 1]), ("frequency", 0.5, "sequential", "", 17.0, [0, 2]),
        ("frequency", 0.5, "one-pass", "moecompress", 19.0, [0, 3]),
        ("frequency", 0.5, "sequential", "moecompress", 17.0, [0, 2]),
        ("frequency", 0.5, "one-pass", "paper", 17.5, [0, 4]),
        ("reap", 0.5, "one-pass", "", 16.0, [1, 2]), ("reap", 0.5, "sequential", "", 13.0, [1, 3]),
        ("reap", 0.5, "one-pass", "moecompress", 15.0, [1, 4]), ("reap", 0.5, "sequential", "moecompress", 14.0, [1, 4]),
        ("reap", 0.5, "one-pass", "paper", 16.0, [1, 2]),
    ])
    check = order_checks(data, "f")
    assert (check["sequential_wins"], check["compared"]) == (2, 3)
    # moecompress's rule changed the kept experts in 3 runs (frequency one-pass, reap one-pass, reap sequential) and
    # helped in 1; the paper's changed them in frequency's one-pass run only, and helped
    assert check["protection"] == {"moecompress": {"changes": 3, "helps": 1}, "paper": {"changes": 1, "helps": 1}}
    assert check["best"]["method"] == "reap" and check["best"]["scoring"] == "sequential"
    assert check["share"] == pytest.approx(3 / 8)
    text = "\n".join(render_scoring_order(data))
    # the columns are those with runs: no sequential run with the paper's rule
    assert ("| reap | - | - | 16.00 | **13.00** | 15.00 (1 protected) | **14.00 (1 protected)** | 16.00 (1 protected) "
            "|\n") in text
    assert "50% one-pass +protect (paper rule)" in text
    assert "lowers mean perplexity in 2 of 3" in text and "share of one-pass frequency's: 0.38" in text


def test_the_suite_covers_every_statistics_only_expert_scorer_but_random() -> None:
    names = sequential_methods()
    assert names[0] == "frequency" and "random" not in names
    assert {"reap", "ean", "ean_sum", "weighted_ean_sum", "easy_ep"} <= set(names)
    assert "naee" not in names and "heapr" not in names
