"""A.X-K1 (SK Telecom): the DeepSeek-V3 router (sigmoid + correction bias + groups).

See deepseek_v3.py for the routing formula and masking argument. The block adds a
`post_mlp_layernorm` on its output (left untouched). MoE layers are the "sparse" entries of
config.mlp_layer_types.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_v3 import DeepseekV3Adapter


@register
class AXK1Adapter(DeepseekV3Adapter):
    model_types = ("axk1",)
