"""A MoE layer larger than the memory budget, computed a group of routed experts at a time.

DeepSeek-V3's 256-expert layer is 11 GB in FP8 and 22 GB in bf16: more than many machines
hold. The layer's other weights (attention, norms, router, shared experts) are loaded as
usual; its routed experts stay on the meta device, and each call of the experts module

    out = sum over groups G of  sum_{e in G} g_{t,e} f_e(x_t)      for the tokens t routed to e

loads one group's experts from the checkpoint (a reader of the same shards that serves only
those experts, with transformers' own conversions, FP8/MXFP4 dequantised), computes them on
their tokens through `MoEAdapter.run_experts` (visitors see every expert with its global
index, as in a single pass), and frees them before the next group. Peak memory is the
layer's other weights plus one group; the cost is reading the layer's experts once per
batch (larger `--batch-size`, fewer reads). The sum over groups is the sum over experts in
another order, so outputs equal the ungrouped ones up to float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moecompress.engine.memory import return_freed_memory
from moecompress.models.adapters.base import EXPERT_SOURCE_ATTR, ExpertVisitor, MoEAdapter, MoELayerRef

if TYPE_CHECKING:
    from moecompress.engine.reader import CheckpointReader



def group_experts(num_experts: int, per_group: int) -> list[list[int]]:
    """Consecutive groups of at most `per_group` experts covering 0..num_experts-1."""
    size = max(1, per_group)
    return [list(range(start, min(start + size, num_experts))) for start in range(0, num_experts, size)]


class ExpertGroups:
    """Serves the routed experts of a checkpoint's MoE layers in groups, one group in memory at a time."""

    def __init__(self, reader: CheckpointReader, groups: Sequence[Sequence[int]],
                 device: torch.device | str = "cpu") -> None:
        self.reader = reader
        self.groups = [list(group) for group in groups]
        self.device = torch.device(device)
        self._readers: dict[tuple[int, ...], CheckpointReader] = {}
        self.loads = 0  # groups loaded so far (each is one read of its experts)

    def _reader_for(self, group: list[int]) -> CheckpointReader:
        key = tuple(group)
        found = self._readers.get(key)
        if found is None:
            adapter, config = self.reader.adapter, self.reader.config
            keep = {ref.index: list(group) for ref in adapter.moe_layers(self.reader.model)}
            found = self.reader.with_experts(keep, adapter.patched_config(config, num_experts=len(group)))
            self._readers[key] = found
        return found

    @contextlib.contextmanager
    def loaded(self, layer_index: int, group: list[int]) -> Iterator[MoELayerRef]:
        """The layer's experts module holding just `group` (local expert i is group[i]), filled inside the block."""
        reader = self._reader_for(group)
        ref = next(r for r in reader.adapter.moe_layers(reader.model) if r.index == layer_index)
        self.loads += 1
        try:
            with reader.loaded(ref.experts, self.device):
                yield ref
        finally:
            # a group's expert tensors (tens of MiB each) are freed into glibc's heap, not to the
            # system: measured at DeepSeek-V3 shapes, 0.3-0.7 GiB of each group stayed resident
            return_freed_memory()

    def run(self, adapter: MoEAdapter, layer: MoELayerRef, hidden: torch.Tensor, index: torch.Tensor,
            weights: torch.Tensor, visit: ExpertVisitor | None, only: set[int] | None) -> torch.Tensor:
        """`run_experts` of the whole layer, one group at a time: hidden (T, H), index/weights (T, k) -> (T, H)."""
        return run_in_groups(adapter, layer, ExpertsCall(hidden, index, weights, visit, only), self.groups,
                             lambda group: self.loaded(layer.index, group))


GroupLoader = Callable[[list[int]], contextlib.AbstractContextManager[MoELayerRef]]


@dataclass(frozen=True)
class ExpertsCall:
    """The arguments of one `MoEAdapter.run_experts` call."""

    hidden: torch.Tensor  # (T, H)
    index: torch.Tensor  # (T, k) routed experts
    weights: torch.Tensor  # (T, k) their gate weights
    visit: ExpertVisitor | None = None
    only: set[int] | None = None  # compute just these experts


@torch.no_grad()
def run_in_groups(adapter: MoEAdapter, layer: MoELayerRef, call: ExpertsCall, groups: Sequence[list[int]],
                  load_group: GroupLoader) -> torch.Tensor:
    """The routed experts' combined output (T, H), computed one group of experts at a time.

    `load_group(group)` enters a context holding an experts module of at least len(group)
    experts whose local expert i is the layer's expert group[i]; groups with no routed (or
    `call.only`) expert are not loaded.
    """
    hidden, index = call.hidden, call.index
    total = torch.zeros(hidden.shape[0], hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    routed = set(torch.unique(index).tolist())
    for group in groups:
        wanted = [e for e in group if e in routed and (call.only is None or e in call.only)]
        if not wanted:
            continue
        local = torch.full((layer.num_experts,), len(group), dtype=index.dtype, device=index.device)
        local[torch.as_tensor(group, device=index.device)] = torch.arange(len(group), dtype=index.dtype,
                                                                          device=index.device)
        local_index = local[index]  # (T, k); experts outside the group -> len(group), never computed
        local_visit = None if call.visit is None else _remapped(call.visit, group)
        with load_group(group) as group_ref:
            out = MoEAdapter.run_experts(adapter, group_ref, hidden, local_index, call.weights, local_visit,
                                         only={group.index(e) for e in wanted})
        total += out.float()
    return total.to(hidden.dtype)


def _remapped(visit: ExpertVisitor, group: list[int]) -> ExpertVisitor:
    """A visitor of a group's module (local expert i) that reports expert group[i] to `visit`."""
    def call(expert: int, *args: Any) -> None:
        visit(group[expert], *args)
    return call


def serving_groups(experts: torch.nn.Module) -> ExpertGroups | None:
    """The groups an experts module is being served in (None: its weights are loaded as usual)."""
    return experts.__dict__.get(EXPERT_SOURCE_ATTR)


@contextlib.contextmanager
def served_in_groups(experts: torch.nn.Module, groups: ExpertGroups) -> Iterator[None]:
    """Within the block, `run_experts` on this experts module computes it group by group."""
    experts.__dict__[EXPERT_SOURCE_ATTR] = groups
    try:
        yield
    finally:
        experts.__dict__.pop(EXPERT_SOURCE_ATTR, None)
