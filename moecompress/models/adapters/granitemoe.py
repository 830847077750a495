"""GraniteMoE: top-k on the raw logits, then softmax over the k chosen; block at `block_sparse_moe`.

In memory the router's logit weight is `router.weight` (transformers renames it to
`router.layer.weight` on disk, and the experts to fused `input_linear` / `output_linear`).
The routed experts' width is `intermediate_size`. The Granite variants with a shared MLP keep
it on the decoder layer (`shared_mlp`, sized by `shared_intermediate_size`), not in the block,
so `moe_layers` attaches it to each layer reference.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef


@register
class GraniteMoeAdapter(MoEAdapter):
    model_types = ("granitemoe",)
    block_attrs = ("block_sparse_moe",)
    router_attr = "router"
    expert_count_keys = ("num_local_experts",)
    intermediate_size_key = "intermediate_size"
    # shared-expert modules that live on the decoder layer next to the MoE block
    layer_shared_attrs: ClassVar[tuple[str, ...]] = ("shared_mlp",)

    def moe_layers(self, model: nn.Module) -> list[MoELayerRef]:
        """MoE blocks, with the decoder layer's shared MLP (when present) as the shared expert."""
        refs = super().moe_layers(model)
        decoder_layers = self.decoder_layers(model)
        for ref in refs:
            layer = decoder_layers[ref.index]
            ref.shared = ref.shared + [
                getattr(layer, attr) for attr in self.layer_shared_attrs if getattr(layer, attr, None) is not None
            ]
        return refs
