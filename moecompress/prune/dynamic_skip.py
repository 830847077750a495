"""NAEE dynamic expert skipping: Not All Experts are Equal (arXiv 2402.14800), section on skipping.

For a top-2 router with combine weights w1 >= w2 for a token, the second expert is skipped when

    w2 < beta * w1,   beta = median over calibration tokens of w2 / w1   (per MoE layer),

so about half of the second-expert calls are skipped on data like the calibration set. The
skipped expert's weight becomes 0 (the other weight is not renormalised, as in the paper).

`measure_betas` computes beta per layer on the pruned routing (the original model with the
pruned experts masked, which the adapters guarantee equals the pruned model) and the fraction
of expert calls skipped on the calibration data. The thresholds are stored in the output's
config under `moecompress.dynamic_skip`; `install_dynamic_skip` (called by `moecompress.load`)
adds a router forward hook that zeroes skipped weights and runs each experts module through
the adapter's `run_experts` on the non-zero (token, expert) pairs only, so a skipped expert
call costs nothing. Plain transformers ignores the entry and runs without skipping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef
from moecompress.models.adapters.instrument import select_experts_implementation

SKIP_IMPLEMENTATION = "moecompress_skip"
_SKIP_RUNNER = "_moecompress_skip_runner"
_SKIP_COUNTS = "_moecompress_skip_counts"
RULE = "skip the second expert when w2 < beta * w1 (NAEE, arXiv 2402.14800)"


def _skip_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
    runner = self.__dict__.get(_SKIP_RUNNER)
    if runner is None:
        raise RuntimeError("experts module selected the moecompress_skip implementation without a skip runner")
    return runner(hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(SKIP_IMPLEMENTATION, _skip_forward)


def router_weights(output: Any) -> torch.Tensor:
    """The (T, k) combine weights from a router's (logits, weights, index, ...) output."""
    if not isinstance(output, tuple) or len(output) < 3:
        raise MoecompressError("dynamic skipping needs a router returning (logits, weights, index); "
                               "this architecture's router does not")
    return output[1]


def check_top2(adapter: MoEAdapter, model: nn.Module) -> list[MoELayerRef]:
    """The MoE layers, after checking that every one routes each token to exactly 2 experts."""
    layers = adapter.moe_layers(model)
    other = sorted({ref.top_k for ref in layers} - {2})
    if other:
        raise MoecompressError(f"dynamic skipping is defined for top-2 routers; this model routes to top-{other[0]}")
    return layers


def second_to_first(weights: torch.Tensor) -> torch.Tensor:
    """w2 / w1 per token for top-2 weights (T, 2) -> (T,), with w1 the larger weight (0 when w1 is 0)."""
    w = weights.detach().reshape(-1, weights.shape[-1]).double().abs()
    high, low = w.max(dim=-1).values, w.min(dim=-1).values
    return torch.where(high > 0, low / high.clamp(min=1e-30), torch.zeros_like(high))


def _run(model: nn.Module, batches: Sequence[tuple[str, torch.Tensor]], desc: str, progress: bool) -> None:
    for _, ids in tqdm(list(batches), desc=desc, unit="batch", disable=not progress):
        model(input_ids=ids, use_cache=False)


@torch.no_grad()
def measure_betas(model: nn.Module, adapter: MoEAdapter, batches: Sequence[tuple[str, torch.Tensor]],
                  keep: dict[int, Sequence[int]] | None = None, progress: bool = True) -> tuple[dict[int, float], float]:
    """beta = median(w2 / w1) per MoE layer on the calibration batches, and the fraction of expert calls skipped.

    keep: experts kept per layer; the routing is measured with the others masked (the pruned
    model). The thresholds come from the routing without skipping (as in the paper); the
    fraction is then measured in a second pass WITH skipping applied, so it includes the
    effect of skipped experts on later layers' routing.
    """
    layers = check_top2(adapter, model)
    ratios: dict[int, list[torch.Tensor]] = {ref.index: [] for ref in layers}
    mask = adapter.mask_experts(model, keep) if keep else contextlib.nullcontext()
    with mask:
        handles = []
        for ref in layers:

            def hook(module: nn.Module, args: Any, output: Any, _layer: int = ref.index) -> None:
                ratios[_layer].append(second_to_first(router_weights(output)))

            handles.append(ref.router.register_forward_hook(hook))
        try:
            _run(model, batches, "router pass (skip thresholds)", progress)
        finally:
            for handle in handles:
                handle.remove()
        betas = {layer: float(torch.cat(parts).median()) for layer, parts in ratios.items()}
        counts = {"calls": 0, "skipped": 0}
        handles = [ref.router.register_forward_hook(_zeroing_hook(betas[ref.index], counts)) for ref in layers]
        try:
            _run(model, batches, "router pass (skipped calls)", progress)
        finally:
            for handle in handles:
                handle.remove()
    return betas, counts["skipped"] / max(counts["calls"], 1)


def skip_settings(betas: dict[int, float], fraction: float) -> dict[str, Any]:
    """The `moecompress.dynamic_skip` config entry."""
    return {"rule": RULE, "beta": {str(layer): float(beta) for layer, beta in sorted(betas.items())},
            "calibration_skip_fraction": float(fraction)}


def _zeroing_hook(beta: float, counts: dict[str, int]):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        weights = router_weights(output)  # (T, 2)
        flat = weights.reshape(-1, weights.shape[-1])
        ratio = second_to_first(flat)
        low_slot = flat.abs().argmin(dim=-1)  # (T,)
        skip = ratio < beta  # (T,)
        new = flat.clone()
        rows = torch.nonzero(skip).flatten()
        new[rows, low_slot[rows]] = 0
        counts["calls"] += flat.numel()
        counts["skipped"] += int(rows.numel())
        return (output[0], new.view_as(weights), *output[2:])

    return hook


def _skip_runner(adapter: MoEAdapter, layer: MoELayerRef):
    def run(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        token, slot = torch.nonzero(weights != 0, as_tuple=True)  # (P,), (P,)
        out = torch.zeros(hidden.shape[0], hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        if token.numel():
            pairs = adapter.run_experts(layer, hidden[token], index[token, slot][:, None], weights[token, slot][:, None])
            out.index_add_(0, token, pairs.float())  # (P, H) summed into (T, H)
        return out.to(hidden.dtype)

    return run


def install_dynamic_skip(model: nn.Module, settings: dict[str, Any]) -> None:
    """Apply stored skip thresholds to a loaded model (router hooks + experts that skip zero weights)."""
    from moecompress.models.load import adapter_for

    adapter = adapter_for(model.config)
    layers = check_top2(adapter, model)
    betas = {int(layer): float(beta) for layer, beta in settings.get("beta", {}).items()}
    missing = sorted({ref.index for ref in layers} - set(betas))
    if missing:
        raise MoecompressError(f"dynamic skip settings lack thresholds for MoE layer(s) {missing}")
    counts = {"calls": 0, "skipped": 0}
    model.__dict__[_SKIP_COUNTS] = counts
    for ref in layers:
        experts = ref.experts
        if not hasattr(experts, "config"):
            raise MoecompressError(f"{type(experts).__name__} does not use transformers' experts dispatch; "
                                   "dynamic skipping cannot be installed")
        ref.router.register_forward_hook(_zeroing_hook(betas[ref.index], counts))
        select_experts_implementation(experts, SKIP_IMPLEMENTATION)
        experts.__dict__[_SKIP_RUNNER] = _skip_runner(adapter, ref)


def skip_counts(model: nn.Module) -> dict[str, int]:
    """Expert calls routed and skipped since `install_dynamic_skip` (calls counts (token, slot) pairs)."""
    counts = model.__dict__.get(_SKIP_COUNTS)
    if counts is None:
        raise MoecompressError("dynamic skipping is not installed on this model")
    return dict(counts)
