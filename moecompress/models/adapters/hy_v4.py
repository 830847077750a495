"""HY-V4 (Tencent Hunyuan): the DeepSeek-V3 router (sigmoid + correction bias + groups).

See deepseek_v3.py for the routing formula and masking argument. Experts use a clamped SwiGLU
(gate <= swiglu_limit, |up| <= swiglu_limit) through the experts module's own `_apply_gate`,
which the canonical experts reuse. MoE layers are the "sparse" entries of
config.mlp_layer_types.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_v3 import DeepseekV3Adapter


@register
class HYV4Adapter(DeepseekV3Adapter):
    model_types = ("hy_v4",)
    # Each decoder layer returns (hidden, top-k indices) and the next layer consumes those
    # indices, so layers cannot be replayed from cached hidden states alone.
    layerwise_supported = False
