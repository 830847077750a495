"""dots3.note text model (rednote): the DeepSeek-V3 router (sigmoid + correction bias + groups).

See deepseek_v3.py for the routing formula and masking argument. The shared experts have
their own width key (shared_experts_intermediate_size x n_shared_experts), so routed neuron
pruning is expressible. MoE layers are the "sparse" entries of config.mlp_layer_types. The
multimodal `dots3_note` wrapper (with routed vision experts) is not handled here.
"""

from __future__ import annotations

from typing import Any

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_v3 import DeepseekV3Adapter


@register
class Dots3NoteTextAdapter(DeepseekV3Adapter):
    model_types = ("dots3_note_text",)

    def check_width_patchable(self, config: Any) -> None:
        """Routed width changes alone: the shared experts are sized by their own key."""
        return None
