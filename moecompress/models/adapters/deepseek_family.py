"""Shared layout of DeepSeek-derived MoE blocks (DeepSeek-V2/V3, GLM-4-MoE, dots1, ...).

The block `mlp` holds a router `gate` (weight (E, H)), routed `experts` and `shared_experts`
that run on every token and are never pruned. The shared experts' width is
moe_intermediate_size x n_shared_experts (see shared_width.py).
"""

from __future__ import annotations

from moecompress.models.adapters.base import MoEAdapter
from moecompress.models.adapters.shared_width import SharedWidthMixin


class DeepseekStyleAdapter(SharedWidthMixin, MoEAdapter):
    """Shared settings of DeepSeek-derived MoE blocks: `mlp.gate` router, `mlp.shared_experts`."""

    block_attrs = ("mlp",)
    router_attr = "gate"
    experts_attr = "experts"
    shared_attrs = ("shared_experts",)
    expert_count_keys = ("n_routed_experts",)
    top_k_key = "num_experts_per_tok"
    intermediate_size_key = "moe_intermediate_size"
    shared_count_key = "n_shared_experts"
