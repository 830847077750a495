"""PreMoe patterns: nearest stored task by L2 distance, file round trip and clear errors."""

from __future__ import annotations

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.prune.patterns import DomainPattern, ExpertPatterns, load_patterns, nearest_pattern, save_patterns


def make_patterns() -> ExpertPatterns:
    return ExpertPatterns(source="m", model_type="qwen3_moe", config_hash="h", params={"top_k": 1, "threshold": None},
                          first_layer=1, num_experts=3, top_k=1, kept_per_layer=2, stats_digest="d",
                          patterns={"code": DomainPattern(keep={1: [0, 1]}, tcess_first=[1.0, 0.0, 0.0]),
                                    "math": DomainPattern(keep={1: [1, 2]}, tcess_first=[0.0, 1.0, 1.0])})


def test_nearest_pattern_by_hand() -> None:
    patterns = make_patterns()
    name, distances = nearest_pattern(patterns, torch.tensor([0.2, 0.9, 0.8]))
    assert name == "math"
    assert distances["code"] == pytest.approx((0.8**2 + 0.9**2 + 0.8**2) ** 0.5)
    assert distances["math"] == pytest.approx((0.2**2 + 0.1**2 + 0.2**2) ** 0.5)
    with pytest.raises(MoecompressError, match="experts"):
        nearest_pattern(patterns, torch.zeros(4))


def test_round_trip_and_errors(tmp_path) -> None:
    path = save_patterns(make_patterns(), tmp_path / "p.json")
    assert load_patterns(path) == make_patterns()
    with pytest.raises(MoecompressError, match="does not exist"):
        load_patterns(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "moecompress-premoe-patterns", "extra": 1}')
    with pytest.raises(MoecompressError, match="not a moecompress patterns file"):
        load_patterns(tmp_path / "bad.json")
