"""Data-parallel quantisation: every rank observes its share of the calibration batches, then the sums are combined.

Under torchrun each rank's layer engine holds only its round-robin share of the batches
(`moecompress.engine.distributed.shard`). What a layer's solves need from the tokens is a
sum over them, so combining the ranks' sums gives what one process observing every batch
would hold (up to the order of additions):

* GPTQ statistics (`GPTQ`): H = (2 / W) sum_t c_t x_t x_t^T over the tokens t with weights c_t
  (W = sum_t c_t). Rank r holds H_r and W_r; the combination is H = sum_r W_r H_r / sum_r W_r,
  reduced in float64, and the token counts are added (they decide the RTN fall-back).
* MC-MoE block errors (`LayerErrors`): sums over tokens of squared output errors, token counts
  and gate sums per expert and width, added.

Expert parallelism for the solves (`solve_experts_in_parallel`): rank r solves every N-th
routed expert of a group (every expert's solve costs the same, its Hessians' size); each
routed expert's Hessians are reduced to that rank alone (`reduce_gptq_to_owners`), and the
solved experts are gathered on every rank. Every rank then holds the same quantised layer
(the other matrices are solved on every rank from the same statistics) and pushes its own
batches through it: GPTQ stays sequential and exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import torch

from moecompress.engine import distributed
from moecompress.quant.gptq import GPTQ
from moecompress.quant.solve import Solved

SolvedExperts = dict[int, dict[str, Solved]]  # expert -> projection -> result


def all_reduce_gptq(stats: Iterable[GPTQ]) -> None:
    """Combine every rank's GPTQ statistics in place (collective, same order on every rank; no-op in one process)."""
    if not distributed.active():
        return
    for item in stats:
        flat = item.hessian.reshape(-1).double() * item.total_weight  # (in * in,) W_r H_r
        packed = torch.cat([flat, torch.tensor([item.total_weight, float(item.tokens)], dtype=torch.float64,
                                               device=flat.device)])
        distributed.all_reduce_(packed, "sum")
        _set_combined(item, packed[:-2], float(packed[-2]), float(packed[-1]))


def _set_combined(item: GPTQ, weighted_sum: torch.Tensor, total: float, tokens: float) -> None:
    """`item` holding every rank's statistics: H = sum_r W_r H_r / sum_r W_r from the summed W_r H_r (in * in,)."""
    item.total_weight, item.tokens = total, int(round(tokens))
    combined = weighted_sum / total if total > 0 else torch.zeros_like(weighted_sum)
    item.hessian = combined.to(item.hessian.dtype).view_as(item.hessian)


def owners(experts: Sequence[int]) -> dict[int, int]:
    """Expert -> the rank that solves it in `solve_experts_in_parallel`: every N-th of the sorted experts."""
    world = distributed.world_size()
    return {e: i % world for i, e in enumerate(sorted(experts))}


def reduce_gptq_to_owners(stats: Sequence[tuple[GPTQ, int]]) -> None:
    """Combine each (statistics, owner rank) pair's GPTQ statistics on the owner alone (collective; no-op in one process).

    Only the owner solves the matrix, so only it needs the combined Hessian: the others send
    their sums and keep their own (unused) ones. The weights and token counts (which decide
    the RTN fall-back, reported on every rank) are combined on every rank, in one reduction.
    """
    if not distributed.active() or not stats:
        return
    scalars = torch.tensor([[item.total_weight, float(item.tokens)] for item, _ in stats], dtype=torch.float64)
    distributed.all_reduce_(scalars, "sum")  # (len(stats), 2)
    me = distributed.rank()
    for (item, owner), (total, tokens) in zip(stats, scalars.tolist()):
        flat = item.hessian.reshape(-1).double() * item.total_weight  # (in * in,) W_r H_r
        distributed.reduce_(flat, owner, "sum")
        if me == owner:
            _set_combined(item, flat, total, tokens)
        else:  # its own Hessian stays (unused); the counts are every rank's
            item.total_weight, item.tokens = total, int(round(tokens))


def all_reduce_sums(tensors: Iterable[torch.Tensor]) -> None:
    """Add every rank's tensors into each rank's, in place, in one reduction (collective; no-op in one process)."""
    parts = list(tensors)
    if not distributed.active() or not parts:
        return
    flat = distributed.all_reduce_(torch.cat([part.reshape(-1).double() for part in parts]), "sum")
    for part, value in zip(parts, flat.split([part.numel() for part in parts])):
        part.copy_(value.view_as(part))


def _moved(solved: SolvedExperts, device: torch.device) -> SolvedExperts:
    """The same results with their tensors on `device` (pickled tensors come back where they were saved)."""
    def move(item: Solved) -> Solved:
        weight = item.weight
        return dataclasses.replace(item, weight=dataclasses.replace(
            weight, codes=weight.codes.to(device), scales=weight.scales.to(device), zeros=weight.zeros.to(device),
            g_idx=weight.g_idx.to(device)))

    return {e: {proj: move(item) for proj, item in per.items()} for e, per in solved.items()}


def solve_experts_in_parallel(solve: Callable[[list[int]], SolvedExperts], experts: Sequence[int],
                              device: torch.device) -> SolvedExperts:
    """`solve(owned)` for this rank's share of `experts` (every N-th); every rank returns every expert's result.

    Collective under torchrun (every rank calls it with the same experts); `solve(experts)` in one process.
    """
    experts = list(experts)
    if not distributed.active():
        return solve(experts)
    mine = _moved(solve(distributed.shard(experts)), torch.device("cpu"))
    merged: SolvedExperts = {}
    for part in distributed.all_gather_objects(mine):
        merged.update(_moved(part, device))
    return {e: merged[e] for e in experts}
