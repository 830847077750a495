"""Routers that take a score-correction bias owned by the MoE block as a forward argument.

MiniMax-M2, HY-V3, AFMoE and LFM2-MoE keep the bias (E,) on the block, not the router, and the
block calls `router(hidden, bias)`. `route` must do the same, and masking sets the block's
bias to -inf for masked experts (through `correction_bias_paths`), so a masked expert is never
chosen by `topk(scores + bias)`.
"""

from __future__ import annotations

import torch

from moecompress.models.adapters.base import MoEAdapter, MoELayerRef, RouterOutput


class BlockBiasRouterAdapter(MoEAdapter):
    """Adapter whose router is called as router(hidden (T, H), block.<block_bias_attr> (E,)).

    Subclasses set `block_bias_attr`; `correction_bias_paths` is derived from it.
    """

    block_bias_attr: str = "e_score_correction_bias"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.correction_bias_paths = (cls.block_bias_attr,)

    def router_inputs(self, layer: MoELayerRef, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The positional arguments the block passes to its router for hidden (T, H)."""
        return hidden, getattr(layer.block, self.block_bias_attr)

    def route(self, layer: MoELayerRef, hidden: torch.Tensor) -> RouterOutput:
        """Run the router with the block's bias, as the block itself does."""
        logits, weights, index = layer.router(*self.router_inputs(layer, hidden))
        return RouterOutput(logits=logits, weights=weights, index=index)
