"""GraniteMoE: top-k on the raw logits, then softmax over the k chosen; block at `block_sparse_moe`.

In memory the router's logit weight is `router.weight` (transformers renames it to
`router.layer.weight` on disk, and the experts to fused `input_linear` / `output_linear`).
The routed experts' width is `intermediate_size`. The Granite variants with a shared MLP
(GraniteMoE-Shared, -SWA, -Hybrid) keep it on the decoder layer (`shared_mlp`, sized by
`shared_intermediate_size`), outside the MoE block, so it is not one of the block's shared
modules: pruning and condensing the block leave it running beside the block unchanged.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class GraniteMoeAdapter(MoEAdapter):
    model_types = ("granitemoe",)
    routing = "topk-softmax"
    block_attrs = ("block_sparse_moe",)
    router_attr = "router"
    expert_count_keys = ("num_local_experts",)
    intermediate_size_key = "intermediate_size"
