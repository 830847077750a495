"""Bailing-Hybrid (Ling/Ring linear): KDA and MLA attention layers; DeepSeek-V3-style sigmoid router.

Routing: sigmoid of the logits plus `gate.e_score_correction_bias` for selection,
group-limited (`num_expert_group` / `topk_group`), un-biased scores gathered, optional
renormalisation (`moe_renormalize`), times `routed_scaling_factor`. The config stores the
expert count as `num_experts` (`num_local_experts` is an alias) and the top-k as
`num_experts_per_token`. Dense prefix layers (`mlp_layer_types`) use `intermediate_size`,
but the shared experts are one MLP sized `moe_intermediate_size * num_shared_experts`, the
routed experts' own key, so uniform neuron dropping needs a model without shared experts.
"""

from __future__ import annotations

from typing import Any

from moecompress.errors import MoecompressError
from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class BailingHybridAdapter(MoEAdapter):
    model_types = ("bailing_hybrid",)
    routing = "sigmoid-bias-group"
    block_attrs = ("mlp",)
    router_attr = "gate"
    shared_attrs = ("shared_experts",)
    expert_count_keys = ("num_experts",)
    top_k_key = "num_experts_per_token"
    intermediate_size_key = "moe_intermediate_size"
    correction_bias_paths = ("gate.e_score_correction_bias",)
    min_kept_per_group = 2  # a group is scored by the sum of its top two experts
    group_keys = ("num_expert_group", "topk_group")

    def check_width_patchable(self, config: Any) -> None:
        """Shared experts are sized by `moe_intermediate_size` too; refuse when the model has any."""
        if getattr(config, "num_shared_experts", 0) > 0:
            raise MoecompressError(
                "this bailing_hybrid model sizes its shared experts with moe_intermediate_size too; "
                "uniform neuron pruning cannot be saved as a stock config: prune whole experts instead"
            )
