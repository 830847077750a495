"""Neuron alignment of two experts, and their aligned weighted sum (the weight math of expert merging).

An expert's function does not depend on the order of its intermediate neurons: permuting the
rows of gate and up and the columns of down by the same P leaves f(x) unchanged. Before two
experts are averaged (M-SMoE, Li et al., arXiv 2310.01334, weight matching), each member's
neurons are permuted to match the representative's:

    P_j = argmax_P sum_k <f_r[k], f_j[P k]>,    f[k] = neuron k's row of gate and up, column of down

solved exactly as a linear assignment (`scipy.optimize.linear_sum_assignment`), and the merged
tensor is sum_j w_j P_j T_j. Used by the in-model merge (`moecompress.prune.materialize`) and by
the streaming tensor copy (`moecompress.io.expert_copy`), so both write the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def neuron_features(tensors: Sequence[torch.Tensor], axes: Sequence[int]) -> torch.Tensor:
    """(I, F) float64: each neuron's weights across an expert's matrices, the intermediate axis of each first."""
    parts = [t.detach().double().movedim(axis, 0).reshape(t.shape[axis], -1) for t, axis in zip(tensors, axes)]
    return torch.cat(parts, dim=1)


def align_neurons(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(I,) permutation p maximising sum_k <base[k], other[p[k]]>: other's neuron p[k] takes place k.

    base, other: (I, F) `neuron_features` of the representative and of one member.
    """
    from scipy.optimize import linear_sum_assignment

    similarity = (base @ other.T).cpu().numpy()  # (I, I)
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    perm = torch.empty(base.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def aligned_sum(parts: Sequence[tuple[torch.Tensor, float, torch.Tensor | None]], axis: int | None) -> torch.Tensor:
    """sum_j w_j P_j T_j in float64, from (T_j, w_j, neuron permutation P_j or None) with the neurons on `axis`.

    axis None: the tensor has no neuron axis (a down-projection bias) and is averaged as it is.
    """
    total = None
    for tensor, weight, perm in parts:
        value = tensor.detach().double()
        if perm is not None and axis is not None:
            value = value.index_select(axis, perm.to(value.device))
        total = value * weight if total is None else total + value * weight
    assert total is not None, "an output expert has at least one member"
    return total
