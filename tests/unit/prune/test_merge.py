"""Expert merging's pieces: distances, average linkage, centroid assignment, weights, refusals."""

from __future__ import annotations

import itertools

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.models.neuron_alignment import align_neurons, aligned_sum, neuron_features
from moecompress.prune.merge import (
    assign_to_centroids,
    average_linkage,
    check_merge_request,
    cluster_layer,
    cosine_distances,
    merge_weights,
    member_weights,
)
from moecompress.prune.plan import PrunePlan


def _three_directions(noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """9 experts whose mean outputs point along 3 directions: {0,3,6}, {1,4,7}, {2,5,8}."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.eye(3, 6, dtype=torch.float64) * 4.0
    return torch.stack([base[e % 3] * (1 + e) + noise * torch.randn(6, generator=gen, dtype=torch.float64)
                        for e in range(9)])


def test_cosine_distances_ignore_scale_and_handle_zero_rows() -> None:
    feats = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    d = cosine_distances(feats)
    assert d.shape == (4, 4) and d.dtype == torch.float64
    assert d[0, 1] == pytest.approx(0.0) and d[0, 2] == pytest.approx(1.0)
    assert d[3, 0] == pytest.approx(1.0) and torch.all(d.diagonal() == 0)
    assert torch.equal(d, d.T)


def test_average_linkage_recovers_separated_groups() -> None:
    d = cosine_distances(_three_directions())
    assert average_linkage(d, range(9), 3) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert average_linkage(d, range(9), 9) == [[e] for e in range(9)]
    assert [len(g) for g in average_linkage(d, range(9), 1)] == [9]


def test_average_linkage_joins_the_pair_with_the_smallest_mean_distance() -> None:
    """One step checked by brute force: after {0,1} join, the next pair is the one with the least mean distance."""
    d = torch.tensor([[0.0, 0.1, 0.5, 0.9], [0.1, 0.0, 0.35, 0.8], [0.5, 0.35, 0.0, 0.45], [0.9, 0.8, 0.45, 0.0]],
                     dtype=torch.float64)
    assert average_linkage(d, range(4), 3) == [[0, 1], [2], [3]]
    # candidates: {0,1}-{2}: mean(0.5, 0.35) = 0.425; {0,1}-{3}: 0.85; {2}-{3}: 0.45
    candidates = {("01", "2"): 0.425, ("01", "3"): 0.85, ("2", "3"): 0.45}
    assert min(candidates, key=candidates.get) == ("01", "2")
    assert average_linkage(d, range(4), 2) == [[0, 1, 2], [3]]


def test_cluster_layer_representatives_groups_and_protection() -> None:
    feats = _three_directions()
    scores = torch.arange(9, dtype=torch.float64)  # the highest id in each cluster scores best
    assert cluster_layer(feats, scores, 3) == {6: [0, 3, 6], 7: [1, 4, 7], 8: [2, 5, 8]}
    # a protected expert stays alone and the rest share the remaining slots
    got = cluster_layer(feats, scores, 3, protected=[4])
    assert got[4] == [4] and len(got) == 3 and sorted(itertools.chain(*got.values())) == list(range(9))
    # group-limited router: 2 groups of 4 (experts 0-3, 4-7), 2 clusters per group
    feats8 = feats[:8]
    grouped = cluster_layer(feats8, scores[:8], 4, groups=(2, 1))
    for rep, members in grouped.items():
        assert len({e // 4 for e in members}) == 1 and rep in members
    assert sum(1 for rep in grouped if rep < 4) == 2
    with pytest.raises(MoecompressError, match="protected super experts exceed"):
        cluster_layer(feats, scores, 2, protected=[0, 1, 2])


def test_assign_to_centroids_nearest_within_group_and_not_into_protected() -> None:
    feats = _three_directions()
    assert assign_to_centroids(feats, [0, 1, 2]) == {0: [0, 3, 6], 1: [1, 4, 7], 2: [2, 5, 8]}
    # expert 0 protected: its direction's experts go to the nearest remaining centroid instead
    got = assign_to_centroids(feats, [0, 1, 2], protected=[0])
    assert got[0] == [0] and sorted(got[1] + got[2]) == [1, 2, 3, 4, 5, 6, 7, 8]
    # groups (0-4 | 5-8): expert 5 (direction 2) cannot join centroid 2 of the other group
    got = assign_to_centroids(feats, [0, 1, 2, 6], groups=None)
    assert 5 in got[2]
    got = assign_to_centroids(feats[:8], [0, 2, 4, 6], groups=(2, 1))
    assert all({e // 4 for e in members} == {rep // 4} for rep, members in got.items())


def test_merge_weights_are_frequencies_and_sum_to_one_per_output_expert() -> None:
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0, 4.0])
    weights = merge_weights({0: [0, 1], 2: [2, 3], 4: [4]}, counts)
    assert weights == {0: [0.75, 0.25], 2: [0.5, 0.5], 4: [1.0]}
    plan = PrunePlan(method="frequency", num_experts=5, top_k=1, keep={0: [0, 2, 4]}, merge="centroid",
                     merged={0: [[0, 1], [2, 3], [4]]}, merge_weights={0: [weights[0], weights[2], weights[4]]})
    merges = plan.merges(0)
    assert len(merges) == 3
    assert all(sum(w for _, w in members) == pytest.approx(1.0) for members in merges)
    assert merges[2] == [(4, 1.0)]  # nothing merged into expert 4: itself alone
    assert member_weights([5, 6], [1.0, 0.0]) == [(5, 1.0)]  # a never-routed member adds nothing
    assert plan.merges(1) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"merge": "average"}, "--merge must be one of none, centroid, cluster"),
    ({"granularity": "neuron"}, "neuron methods"),
    ({"allocation": "global"}, "--allocation uniform"),
    ({"scoring": "sequential"}, "--scoring one-pass"),
    ({"dynamic_skip": True}, "--dynamic-skip"),
    ({"patterns": "p.json"}, "--patterns"),
])
def test_merge_requests_it_cannot_serve_are_refused(kwargs, message) -> None:
    request = {"merge": "centroid", "granularity": "expert", "allocation": "uniform", **kwargs}
    with pytest.raises(MoecompressError, match=message):
        check_merge_request(**request)
    check_merge_request("none", "neuron", "global", "sequential", True, "p.json")  # nothing to refuse


def test_align_neurons_undoes_a_permutation_and_beats_every_other_order() -> None:
    gen = torch.Generator().manual_seed(3)
    gate, up, down = (torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen),
                      torch.randn(4, 6, generator=gen))  # (I, H), (I, H), (H, I)
    shuffle = torch.tensor([4, 0, 5, 1, 3, 2])
    base = neuron_features([gate, up, down], [0, 0, 1])
    assert base.shape == (6, 12)
    other = neuron_features([gate[shuffle], up[shuffle], down[:, shuffle]], [0, 0, 1])
    perm = align_neurons(base, other)
    assert torch.equal(gate[shuffle][perm], gate) and torch.equal(down[:, shuffle][:, perm], down)
    # on unrelated experts: the exact optimum over all 720 orders
    noise = neuron_features([torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen),
                             torch.randn(4, 6, generator=gen)], [0, 0, 1])
    perm = align_neurons(base, noise)
    best = max(sum(float(base[k] @ noise[p[k]]) for k in range(6)) for p in itertools.permutations(range(6)))
    assert sorted(perm.tolist()) == list(range(6))
    assert sum(float(base[k] @ noise[perm[k]]) for k in range(6)) == pytest.approx(best)


def test_aligned_sum_reorders_neurons_before_weighting() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (I=2, H=2), neurons on axis 0
    b = torch.tensor([[30.0, 40.0], [10.0, 20.0]])  # a's neurons x10, in the other order
    got = aligned_sum([(a, 0.5, None), (b, 0.5, torch.tensor([1, 0]))], axis=0)
    assert got.dtype == torch.float64 and torch.equal(got, a.double() * 5.5)
    bias = aligned_sum([(torch.tensor([1.0, 3.0]), 0.25, torch.tensor([1, 0])), (torch.tensor([5.0, 7.0]), 0.75, None)],
                       axis=None)  # no neuron axis: averaged as stored
    assert torch.equal(bias, torch.tensor([4.0, 6.0], dtype=torch.float64))
