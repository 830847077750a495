"""GLM-MoE-DSA (GLM-5, sparse indexed attention): the DeepSeek-V3 router.

Sigmoid scores, score-correction bias, group-limited top-k: see deepseek_v3.py for the routing
formula and masking argument. MoE layers are the "sparse" entries of config.mlp_layer_types.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_v3 import DeepseekV3Adapter


@register
class GlmMoeDsaAdapter(DeepseekV3Adapter):
    model_types = ("glm_moe_dsa",)
    # Each decoder layer returns (hidden, top-k indices) and the next layer consumes those
    # indices, so layers cannot be replayed from cached hidden states alone.
    layerwise_supported = False
