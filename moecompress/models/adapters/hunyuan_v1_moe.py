"""Hunyuan-MoE v1 (Hunyuan-A13B): softmax router `gate.wg` (fp32 Linear), top-k, renormalised.

The top-k key is `moe_topk`, which may be a per-layer list; each MoE layer reference carries
its own k. A dense shared MLP sits in every MoE block and is sized by `intermediate_size`,
the same key as the routed experts, so uniform neuron dropping cannot be expressed in a
stock config.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moecompress.errors import MoecompressError
from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef


@register
class HunYuanMoEV1Adapter(MoEAdapter):
    model_types = ("hunyuan_v1_moe",)
    routing = "softmax-renorm"
    block_attrs = ("mlp",)
    router_attr = "gate"
    router_weight_attr = "wg.weight"
    shared_attrs = ("shared_mlp",)
    expert_count_keys = ("num_experts",)
    top_k_key = "moe_topk"
    intermediate_size_key = "intermediate_size"

    def top_k(self, config: Any) -> int:
        """Experts chosen per token; for a per-layer `moe_topk` list, the largest (the binding one for pruning)."""
        value = getattr(config, self.top_k_key)
        return int(max(value)) if isinstance(value, (list, tuple)) else int(value)

    def moe_layers(self, model: nn.Module) -> list[MoELayerRef]:
        """MoE blocks, each with the k its own router uses."""
        refs = super().moe_layers(model)
        for ref in refs:
            ref.top_k = int(ref.router.top_k)
        return refs

    def check_width_patchable(self, config: Any) -> None:
        """The shared MLP is sized by `intermediate_size` too: one key cannot give the two different widths."""
        raise MoecompressError(
            "hunyuan_v1_moe sizes its shared MLP and its routed experts with the same intermediate_size; uniform "
            "neuron pruning of the routed experts cannot be saved as a stock config: prune whole experts instead"
        )
