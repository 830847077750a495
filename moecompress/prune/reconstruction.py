"""Layer outputs on cached inputs, for reconstruction-based pruning (NAEE) and dynamic skipping.

`block_inputs` walks the decoder one layer at a time over the calibration batches
(`LayerEngine`) and yields, for every MoE layer, the inputs its MoE block received in the
ORIGINAL model, as one (N, H) matrix of tokens (a seeded subsample when `max_tokens` is
set). `block_output` runs the block itself on such tokens, optionally with all experts but
`keep` masked in the router, which the adapters guarantee equals the block with those
experts physically removed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from moecompress.engine.layers import LayerEngine
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef

log = logging.getLogger(__name__)


def _row_choice(total: int, max_tokens: int | None, seed: int, layer: int) -> torch.Tensor | None:
    """Sorted token rows kept for a layer (None = all), a seeded choice of max_tokens out of total."""
    if max_tokens is None or total <= max_tokens:
        return None
    gen = torch.Generator().manual_seed(seed * 7919 + layer)
    return torch.randperm(total, generator=gen)[:max_tokens].sort().values


def block_inputs(model: nn.Module, adapter: MoEAdapter, batches: Sequence[tuple[str, torch.Tensor]],
                 max_tokens: int | None = None, seed: int = 0, progress: bool = True
                 ) -> Iterator[tuple[MoELayerRef, torch.Tensor]]:
    """(layer, x (N, H)) for every MoE layer in order: its block's inputs on the calibration tokens.

    Runs one decoder layer at a time (`LayerEngine`), so only one layer's inputs are held.
    Architectures whose decoder layers pass extra outputs to the next layer (GLM-MoE-DSA and
    HY-V4 thread their indexer's top-k through the layers) cannot run that way; for them every
    MoE block's (subsampled) inputs are captured in ordinary forward passes instead.
    """
    batches = list(batches)
    total = sum(int(ids.numel()) for _, ids in batches)
    runner = LayerEngine(model, adapter)
    try:
        runner.prepare(batches)
    except (ValueError, TypeError, RuntimeError) as err:
        log.warning("layer-at-a-time execution failed (%s); capturing MoE inputs in whole-model passes", err)
        yield from _whole_model_inputs(model, adapter, batches, total, max_tokens, seed, progress)
        return
    moe = {ref.index: ref for ref in adapter.moe_layers(model)}
    for index in tqdm(range(len(runner.layers)), desc="layer inputs", unit="layer", disable=not progress):
        if index not in moe:
            runner.run_layer(index)
            continue
        captured: list[torch.Tensor] = []

        def capture(module: nn.Module, args: tuple) -> None:
            hidden = args[0]
            captured.append(hidden.detach().reshape(-1, hidden.shape[-1]))

        handle = moe[index].block.register_forward_pre_hook(capture)
        try:
            runner.run_layer(index)
        finally:
            handle.remove()
        tokens = torch.cat(captured)  # (N, H)
        rows = _row_choice(tokens.shape[0], max_tokens, seed, index)
        yield moe[index], tokens if rows is None else tokens[rows]


@torch.no_grad()
def _whole_model_inputs(model: nn.Module, adapter: MoEAdapter, batches: list[tuple[str, torch.Tensor]], total: int,
                        max_tokens: int | None, seed: int, progress: bool
                        ) -> Iterator[tuple[MoELayerRef, torch.Tensor]]:
    """Every MoE block's inputs from ordinary forward passes, subsampled while captured."""
    layers = adapter.moe_layers(model)
    rows = {ref.index: _row_choice(total, max_tokens, seed, ref.index) for ref in layers}
    captured: dict[int, list[torch.Tensor]] = {ref.index: [] for ref in layers}
    offset = {"start": 0}
    handles = []
    for ref in layers:

        def capture(module: nn.Module, args: tuple, _layer: int = ref.index) -> None:
            hidden = args[0].detach().reshape(-1, args[0].shape[-1])  # (n, H)
            chosen = rows[_layer]
            if chosen is not None:
                start = offset["start"]
                local = chosen[(chosen >= start) & (chosen < start + hidden.shape[0])] - start
                hidden = hidden[local]
            captured[_layer].append(hidden.clone())

        handles.append(ref.block.register_forward_pre_hook(capture))
    try:
        for _, ids in tqdm(batches, desc="layer inputs", unit="batch", disable=not progress):
            model(input_ids=ids, use_cache=False)
            offset["start"] += int(ids.numel())
    finally:
        for handle in handles:
            handle.remove()
    for ref in layers:
        yield ref, torch.cat(captured[ref.index])


@torch.no_grad()
def block_output(model: nn.Module, adapter: MoEAdapter, layer: MoELayerRef, tokens: torch.Tensor,
                 keep: Sequence[int] | None = None) -> torch.Tensor:
    """The MoE block's output (N, H) on tokens (N, H); with `keep`, only those experts can be routed to."""
    mask = adapter.mask_experts(model, {layer.index: list(keep)}) if keep is not None else contextlib.nullcontext()
    with mask:
        out = layer.block(tokens.unsqueeze(0))
    if isinstance(out, tuple):
        out = out[0]
    return out.reshape(-1, tokens.shape[-1])


def reconstruction_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||Z - Z_hat||_F^2 in float64."""
    return float((reference.double() - approx.double()).square().sum())
