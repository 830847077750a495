"""PreMoe's task-conditional expected selection score (TCESS) from raw router logits.

PreMoe: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval (arXiv 2505.17639):

    TCESS_j = (1/T) sum_t 1[j in TopK(l_t) and softmax(l_t)_j >= r] l_{t,j}

with l_t the raw router logits of token t. The observer's `top1_logit` statistic covers the
reference code's default (top-k 1, r off); this module computes the general form in a light
forward pass with a hook on each router (no expert instrumentation), also used by
`route-task` on the first MoE layer only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from moecompress.models.adapters.base import MoEAdapter


def tcess_sums(logits: torch.Tensor, top_k: int = 1, threshold: float | None = None) -> torch.Tensor:
    """sum_t 1[j in TopK(l_t) and softmax(l_t)_j >= r] l_{t,j} for logits (T, E) -> (E,) float64."""
    logits = logits.detach().reshape(-1, logits.shape[-1]).double()  # (T, E)
    k = min(top_k, logits.shape[-1])
    values, index = logits.topk(k, dim=-1)  # (T, k)
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, index, True)
    if threshold is not None:
        chosen &= torch.softmax(logits, dim=-1) >= threshold
    return torch.where(chosen, logits, torch.zeros_like(logits)).sum(dim=0)


class _FirstLayerDone(Exception):
    """Raised by the router hook to stop a forward once the first MoE layer's router has run."""


@torch.no_grad()
def collect_tcess(model: nn.Module, adapter: MoEAdapter, batches: Sequence[tuple[str, torch.Tensor]], top_k: int = 1,
                  threshold: float | None = None, first_layer_only: bool = False, progress: bool = True
                  ) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, int]]:
    """TCESS sums per MoE layer and domain, and tokens per domain, over (domain, (B, S) ids) batches.

    first_layer_only: stop every forward right after the first MoE layer's router (retrieval).
    """
    layers = adapter.moe_layers(model)
    if first_layer_only:
        layers = layers[:1]
    sums: dict[int, dict[str, torch.Tensor]] = {ref.index: {} for ref in layers}
    tokens: dict[str, int] = {}
    state = {"domain": ""}
    handles = []
    for ref in layers:

        def hook(module: nn.Module, args: object, output: object, _layer: int = ref.index) -> None:
            logits = adapter.router_logits_from_output(output)
            per = sums[_layer]
            value = tcess_sums(logits, top_k, threshold)
            per[state["domain"]] = per.get(state["domain"], torch.zeros_like(value)) + value
            if first_layer_only:
                raise _FirstLayerDone

        handles.append(ref.router.register_forward_hook(hook))
    try:
        for domain, ids in tqdm(list(batches), desc="router pass (TCESS)", unit="batch", disable=not progress):
            state["domain"] = domain
            tokens[domain] = tokens.get(domain, 0) + int(ids.numel())
            try:
                model(input_ids=ids, use_cache=False)
            except _FirstLayerDone:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return sums, tokens
