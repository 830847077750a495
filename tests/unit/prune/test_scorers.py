"""Each scorer against scores computed by hand on tiny statistics."""

from __future__ import annotations

import pytest
import torch

from moecompress.calibration.stats import RoutingStats, StatsHeader
from moecompress.errors import MoecompressError
from moecompress.prune.scorers import available_scorers, get_scorer


def make_stats(tensors: dict[str, dict[str, list[float]]], tokens: dict[str, int], num_experts: int = 4) -> RoutingStats:
    """Stats for one MoE layer (index 1) from {statistic: {domain: values}}."""
    domains = sorted(tokens)
    header = StatsHeader(model_type="qwen3_moe", config_hash="x", model_path="m", moe_layers=[1], num_experts=num_experts,
                         top_k=2, intermediate_size=2, domains=domains, statistics=sorted(tensors),
                         tokens={"1": tokens}, data_digest="d", data={}, mode="layerwise", seed=0, versions={})
    flat = {RoutingStats.key(stat, 1, d): torch.tensor(v, dtype=torch.float64)
            for stat, per in tensors.items() for d, v in per.items()}
    return RoutingStats(header, flat)


def test_frequency_and_soft_count() -> None:
    stats = make_stats({"count": {"a": [3, 0, 5, 2]}, "soft_count": {"a": [1.5, 0, 2.0, 0.5]}}, {"a": 5})
    assert get_scorer("frequency").score(stats)[1].tolist() == [3, 0, 5, 2]
    assert get_scorer("soft_count").score(stats)[1].tolist() == [1.5, 0, 2.0, 0.5]


def test_reap_is_mean_gated_norm_and_ean_mean_norm() -> None:
    stats = make_stats({"count": {"a": [2, 0, 4, 1]}, "gated_out_norm": {"a": [1.0, 0.0, 2.0, 3.0]},
                        "out_norm": {"a": [4.0, 0.0, 2.0, 5.0]}}, {"a": 4})
    assert get_scorer("reap").score(stats)[1].tolist() == [0.5, 0.0, 0.5, 3.0]
    assert get_scorer("ean").score(stats)[1].tolist() == [2.0, 0.0, 0.5, 5.0]
    # the REAP reference's EAN and weighted EAN are the sums: an expert few tokens reach ranks low
    assert get_scorer("ean_sum").score(stats)[1].tolist() == [4.0, 0.0, 2.0, 5.0]
    assert get_scorer("weighted_ean_sum").score(stats)[1].tolist() == [1.0, 0.0, 2.0, 3.0]


def test_easy_ep_single_domain_sum_and_multi_domain_normalise_and_sum() -> None:
    stats = make_stats({"easy_ep": {"a": [1.0, 3.0, 0.0, 0.0], "b": [0.0, 0.0, 2.0, 2.0]}}, {"a": 4, "b": 4})
    assert get_scorer("easy_ep").score(stats, domain="a")[1].tolist() == [1.0, 3.0, 0.0, 0.0]
    # a normalised: [.25, .75, 0, 0]; b normalised: [0, 0, .5, .5]
    assert get_scorer("easy_ep").score(stats)[1].tolist() == [0.25, 0.75, 0.5, 0.5]
    assert get_scorer("easy_ep").score(stats, {"multi_domain": False})[1].tolist() == [1.0, 3.0, 2.0, 2.0]


def test_premoe_tcess_divides_by_tokens() -> None:
    stats = make_stats({"top1_logit": {"a": [4.0, 0.0, 2.0, 8.0], "b": [0.0, 6.0, 0.0, 0.0]}}, {"a": 4, "b": 2})
    assert get_scorer("premoe").score(stats, domain="a")[1].tolist() == [1.0, 0.0, 0.5, 2.0]
    assert get_scorer("premoe").score(stats)[1].tolist() == [4 / 6, 1.0, 2 / 6, 8 / 6]


def test_random_is_seeded() -> None:
    stats = make_stats({"count": {"a": [1, 1, 1, 1]}}, {"a": 2})
    first = get_scorer("random").score(stats, {"seed": 3})[1]
    again = get_scorer("random").score(stats, {"seed": 3})[1]
    other = get_scorer("random").score(stats, {"seed": 4})[1]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_missing_statistic_and_bad_params_fail_clearly() -> None:
    stats = make_stats({"count": {"a": [1, 1, 1, 1]}}, {"a": 2})
    with pytest.raises(MoecompressError, match="needs statistic"):
        get_scorer("reap").score(stats)
    with pytest.raises(MoecompressError, match="seed"):
        get_scorer("random").parse_params({"seed": "x"})
    with pytest.raises(MoecompressError, match="unknown pruning method"):
        get_scorer("nope")
    with pytest.raises(MoecompressError, match="Extra inputs"):
        get_scorer("frequency").parse_params({"alpha": 1})


def test_every_scorer_declares_statistics_and_a_summary() -> None:
    for name, scorer in available_scorers().items():
        assert scorer.summary, name
        assert isinstance(scorer.statistics(), tuple)
        assert scorer.granularity in ("expert", "neuron")
    expected = {"frequency", "soft_count", "reap", "ean", "easy_ep", "premoe", "heapr", "naee", "random"}
    assert expected <= set(available_scorers())
    assert get_scorer("heapr").granularity == "neuron"
    assert get_scorer("naee").uses_model() and not get_scorer("reap").uses_model()


def test_heapr_is_mean_act_sq_times_mean_grad_proj() -> None:
    stats = make_stats({"count": {"a": [2, 0, 4, 1]},
                        "neuron_act_sq": {"a": [[4.0, 2.0], [1.0, 1.0], [8.0, 0.0], [3.0, 1.0]]},
                        "neuron_grad_proj": {"a": [[6.0, 1.0], [5.0, 5.0], [4.0, 2.0], [2.0, 7.0]]}}, {"a": 5})
    scores = get_scorer("heapr").score(stats)[1]
    # expert 0: (4/2)(6/2)=6, (2/2)(1/2)=0.5; expert 1 never routed: 0; expert 2: (8/4)(4/4)=2, 0;
    # expert 3: (3/1)(2/1)=6, (1/1)(7/1)=7
    assert scores.tolist() == [[6.0, 0.5], [0.0, 0.0], [2.0, 0.0], [6.0, 7.0]]


def test_premoe_options_need_the_model_and_default_reads_top1_logit() -> None:
    scorer = get_scorer("premoe")
    assert scorer.statistics() == ("top1_logit",) and not scorer.uses_model()
    assert scorer.statistics({"top_k": 2}) == () and scorer.uses_model({"top_k": 2})
    assert scorer.uses_model({"threshold": 0.3})
    stats = make_stats({"top1_logit": {"a": [4.0, 0.0, 2.0, 8.0]}}, {"a": 4})
    with pytest.raises(MoecompressError, match="needs the model"):
        scorer.score(stats, {"top_k": 2})
    with pytest.raises(MoecompressError, match="threshold"):
        scorer.parse_params({"threshold": 1.5})


def test_tcess_with_top_k_and_threshold_by_hand() -> None:
    from moecompress.prune.tcess import tcess_sums

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 2.5], [1.5, 1.0, 5.0]])
    # top-1: token0 -> e0 (2.0), token1 -> e1 (3.0), token2 -> e2 (5.0)
    assert tcess_sums(logits, 1).tolist() == [2.0, 3.0, 5.0]
    # top-2: token0 -> e0, e1; token1 -> e1, e2; token2 -> e2, e0
    assert tcess_sums(logits, 2).tolist() == [3.5, 4.0, 7.5]
    # threshold 0.3 on softmax: token0 probs (.665, .245, .090): e0 only; token1 (.030, .604, .366): e1, e2;
    # token2 (.029, .018, .953): e2
    assert tcess_sums(logits, 2, threshold=0.3).tolist() == [2.0, 3.0, 7.5]
