"""Expert merging: fold the experts a plan removes into the experts it keeps, instead of dropping them.

Both modes group the E experts of a MoE layer into K clusters (K = the experts kept) and
write one expert per cluster, so the output is a stock checkpoint with K experts per layer.

* ``cluster`` (HC-SMoE, Chen et al., arXiv 2410.08589): experts are compared by their average
  output on calibration tokens, o_j = (1/T) sum_t f_j(x_t) over EVERY token t of the layer
  (routed or not: the `mean_output` statistic), with d(i, j) = 1 - cos(o_i, o_j), and grouped by
  agglomerative clustering with average linkage (the distance of two clusters is the mean
  pairwise distance of their members) until K clusters remain. The method's scorer then only
  names each cluster's representative: its highest-scoring member.
* ``centroid`` (M-SMoE, Li et al., arXiv 2310.01334, "dominant experts"; the REAP reference's
  merging around score centroids): the K experts the method's scorer keeps are the centroids,
  and every other expert joins the centroid nearest to it under the same distance.

Merged weights (both papers' frequency-weighted average), per cluster C with token counts N_j:

    W_C = sum_{j in C} N_j W_j / sum_{j in C} N_j      for gate, up, down and their biases

(1/|C| each when no member was routed). Before averaging, each member's intermediate neurons
are permuted to match the representative's (M-SMoE's weight matching; an expert's function does
not depend on the order of its neurons, so W_j is replaced by P_j W_j with P_j the
permutation that maximises sum_k <f_r[k], f_j[P_j k]>, f[k] = neuron k's row of gate and up and
column of down, solved exactly by `scipy.optimize.linear_sum_assignment`; `moecompress.models.neuron_alignment`). Even so, on the fixtures merging
lost to dropping in almost every run (benchmarks/RESULTS.md, expert merging), so it is off by
default. The merged expert takes its representative's router row, router bias and correction
bias: the router is not re-fitted.

Constraints: group-limited routers cluster within each group (equal count per group);
protected super experts stay single, unmerged, and no expert joins them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moecompress.errors import MoecompressError

MERGE_MODES = ("none", "centroid", "cluster")
DEFAULT_MERGE = "none"
MERGE_STATISTICS = ("count", "mean_output")


def check_merge(merge: str) -> str:
    """The merge mode, or a one-line error naming the modes."""
    if merge not in MERGE_MODES:
        raise MoecompressError(f"--merge must be one of {', '.join(MERGE_MODES)} (got {merge!r})")
    return merge


def check_merge_request(merge: str, granularity: str, allocation: str, scoring: str = "one-pass",
                        dynamic_skip: bool = False, patterns: object = None) -> None:
    """Refuse, in one line each, what merging cannot serve (needs no model)."""
    check_merge(merge)
    if merge == "none":
        return
    if granularity != "expert":
        raise MoecompressError(f"--merge {merge} folds whole experts together; neuron methods (heapr) cannot merge")
    if allocation != "uniform":
        raise MoecompressError(f"--merge {merge} writes the same expert count in every layer: use --allocation uniform")
    if scoring != "one-pass":
        raise MoecompressError(f"--merge {merge} merges after scoring on the unpruned model: use --scoring one-pass")
    if dynamic_skip:
        raise MoecompressError("--dynamic-skip thresholds are measured on the pruned, not the merged, experts; "
                               "drop --merge or --dynamic-skip")
    if patterns is not None:
        raise MoecompressError("--patterns stores PreMoe's per-domain pruning patterns; drop --merge or --patterns")


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """d(i, j) = 1 - cos(o_i, o_j) for features (E, H) -> (E, E), float64; 1 against an all-zero row."""
    feats = features.double()
    norms = feats.norm(dim=-1, keepdim=True)  # (E, 1)
    unit = torch.where(norms > 0, feats / norms.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(feats))
    distances = (1.0 - unit @ unit.T).clamp(min=0.0)  # (E, E)
    distances.fill_diagonal_(0.0)
    return distances


def average_linkage(distances: torch.Tensor, members: Sequence[int], clusters: int) -> list[list[int]]:
    """Agglomerative clustering of `members` with average linkage into `clusters` groups.

    distances: (E, E) over all experts of the layer. Repeatedly joins the two clusters whose
    mean pairwise distance is smallest (ties: the pair with the smallest member ids) until
    `clusters` remain. Returns the groups, each sorted, ordered by their smallest member.
    """
    groups = [[m] for m in sorted(members)]
    if clusters < 1:
        raise ValueError("average_linkage needs at least one cluster")
    while len(groups) > clusters:
        best: tuple[float, int, int] | None = None
        for a in range(len(groups)):
            rows = torch.as_tensor(groups[a])
            for b in range(a + 1, len(groups)):
                value = float(distances[rows][:, torch.as_tensor(groups[b])].mean())
                if best is None or value < best[0] - 1e-12:
                    best = (value, a, b)
        assert best is not None
        _, a, b = best
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups, key=lambda group: group[0])


def _groups_of(num_experts: int, groups: tuple[int, int] | None) -> list[list[int]]:
    """Expert ids per router group (one group for routers without groups)."""
    if groups is None:
        return [list(range(num_experts))]
    size = num_experts // groups[0]
    return [list(range(g * size, (g + 1) * size)) for g in range(groups[0])]


def cluster_layer(features: torch.Tensor, scores: torch.Tensor, keep: int, groups: tuple[int, int] | None = None,
                  protected: Sequence[int] = ()) -> dict[int, list[int]]:
    """HC-SMoE clusters of one layer: representative -> members (the representative included).

    features: (E, H) summed expert outputs over all tokens; scores: (E,) the method's scores,
    which choose each cluster's representative (highest score, then lowest id). `keep`
    clusters in all (keep / n_group per group); protected experts are singleton clusters.
    """
    num_experts = features.shape[0]
    distances = cosine_distances(features)
    per_group = keep // (groups[0] if groups is not None else 1)
    must = set(protected)
    out: dict[int, list[int]] = {}
    for members in _groups_of(num_experts, groups):
        singles = [e for e in members if e in must]
        rest = [e for e in members if e not in must]
        wanted = per_group - len(singles)
        if wanted < 0:
            raise MoecompressError(f"{len(singles)} protected super experts exceed the {per_group} experts kept "
                                   f"{'per group' if groups else 'per layer'}; keep more experts or pass "
                                   "--no-protect-super-experts")
        for expert in singles:
            out[expert] = [expert]
        if not rest or wanted == 0:
            continue  # every slot is a protected expert: the others are dropped
        for cluster in average_linkage(distances, rest, min(wanted, len(rest))):
            representative = min(cluster, key=lambda e: (-float(scores[e]), e))
            out[representative] = cluster
    return dict(sorted(out.items()))


def assign_to_centroids(features: torch.Tensor, kept: Sequence[int], groups: tuple[int, int] | None = None,
                        protected: Sequence[int] = ()) -> dict[int, list[int]]:
    """M-SMoE-style clusters of one layer: each removed expert joins its nearest kept expert.

    kept: the experts the method's scorer keeps (the centroids); the nearest is by cosine
    distance of mean outputs within the same router group (ties: the lower id). Protected
    experts take no members; a removed expert with no unprotected centroid in its group is
    dropped. Returns centroid -> members (the centroid first is not implied: sorted ids).
    """
    distances = cosine_distances(features)
    kept_set, must = set(kept), set(protected)
    out: dict[int, list[int]] = {e: [e] for e in sorted(kept_set)}
    for members in _groups_of(features.shape[0], groups):
        centroids = [e for e in members if e in kept_set and e not in must]
        if not centroids:
            continue
        for expert in members:
            if expert in kept_set:
                continue
            nearest = min(centroids, key=lambda c: (float(distances[expert, c]), c))
            out[nearest].append(expert)
    return {e: sorted(ids) for e, ids in out.items()}


def merge_weights(clusters: dict[int, list[int]], counts: torch.Tensor) -> dict[int, list[float]]:
    """Frequency weights N_j / sum N per cluster (uniform where no member was routed), aligned with members."""
    out: dict[int, list[float]] = {}
    for representative, members in clusters.items():
        n = counts[torch.as_tensor(members)].double()  # (|C|,)
        total = float(n.sum())
        out[representative] = [float(v) / total for v in n] if total > 0 else [1.0 / len(members)] * len(members)
    return out


def member_weights(members: Sequence[int], weights: Sequence[float]) -> list[tuple[int, float]]:
    """(member, weight) of one output expert, members of weight 0 (never routed) left out."""
    return [(expert, weight) for expert, weight in zip(members, weights) if weight != 0.0]


def check_merge_statistics(stats: object, merge: str) -> None:
    """A one-line error when `stats` lack what `merge` reads (count, mean_output), naming the calibrate flags."""
    if merge == "none":
        return
    missing = [name for name in MERGE_STATISTICS if not stats.has(name)]  # type: ignore[attr-defined]
    if missing:
        raise MoecompressError(f"--merge {merge} needs statistic(s) {', '.join(missing)} that --stats lack; "
                               "re-run calibrate with "
                               f"{' '.join('--statistic ' + name for name in MERGE_STATISTICS)} (or drop --stats)")


def plan_merges(stats: object, mode: str, scores: dict[int, torch.Tensor], kept: dict[int, list[int]],
                shape: object, count: int, protected: dict[int, list[int]], domain: str | None = None
                ) -> tuple[dict[int, list[int]], dict[int, list[list[int]]], dict[int, list[list[float]]]]:
    """(kept experts, members merged into each kept expert, their weights) per layer, for `mode`.

    stats: `RoutingStats` with `mean_output` and `count` (of `domain`, or all domains);
    scores/kept: the method's scores and its selection (the centroids of ``centroid``);
    shape: the router's `RoutingShape`; count: experts kept per layer.
    """
    check_merge_statistics(stats, mode)
    keep: dict[int, list[int]] = {}
    merged: dict[int, list[list[int]]] = {}
    weights: dict[int, list[list[float]]] = {}
    groups = getattr(shape, "groups", None)
    for layer, layer_scores in sorted(scores.items()):
        features = stats.get("mean_output", layer, domain)  # type: ignore[attr-defined]  # (E, H)
        counts = stats.get("count", layer, domain)  # type: ignore[attr-defined]  # (E,)
        if mode == "cluster":
            clusters = cluster_layer(features, layer_scores, count, groups, protected.get(layer, []))
        else:
            clusters = assign_to_centroids(features, kept[layer], groups, protected.get(layer, []))
        per = merge_weights(clusters, counts)
        keep[layer] = sorted(clusters)
        merged[layer] = [clusters[e] for e in keep[layer]]
        weights[layer] = [per[e] for e in keep[layer]]
    return keep, merged, weights
