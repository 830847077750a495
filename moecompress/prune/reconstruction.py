"""Layer outputs on cached inputs, for reconstruction-based pruning (NAEE) and dynamic skipping.

`block_inputs` walks the decoder one layer at a time over the calibration batches
(`LayerwiseRunner`) and yields, for every MoE layer, the inputs its MoE block received in the
ORIGINAL model, as one (N, H) matrix of tokens (a seeded subsample when `max_tokens` is
set). `block_output` runs the block itself on such tokens, optionally with all experts but
`keep` masked in the router, which the adapters guarantee equals the block with those
experts physically removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from moecompress.calibration.layerwise import LayerwiseRunner
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef


def block_inputs(model: nn.Module, adapter: MoEAdapter, batches: Sequence[tuple[str, torch.Tensor]],
                 max_tokens: int | None = None, seed: int = 0, progress: bool = True
                 ) -> Iterator[tuple[MoELayerRef, torch.Tensor]]:
    """(layer, x (N, H)) for every MoE layer in order: its block's inputs on the calibration tokens."""
    runner = LayerwiseRunner(model, adapter)
    runner.prepare(list(batches))
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
        if max_tokens is not None and tokens.shape[0] > max_tokens:
            gen = torch.Generator().manual_seed(seed * 7919 + index)
            rows = torch.randperm(tokens.shape[0], generator=gen)[:max_tokens].sort().values
            tokens = tokens[rows]
        yield moe[index], tokens


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
