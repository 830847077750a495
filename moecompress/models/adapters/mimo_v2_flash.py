"""MiMo-V2-Flash (Xiaomi): the DeepSeek-V3 router (sigmoid + correction bias + groups).

See deepseek_v3.py for the routing formula and masking argument. Unlike DeepSeek-V3 the
block has no shared experts, so routed-expert neuron pruning is expressible. MoE layers are
the "sparse" entries of config.mlp_layer_types.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_v3 import DeepseekV3Adapter


@register
class MiMoV2FlashAdapter(DeepseekV3Adapter):
    model_types = ("mimo_v2_flash",)
    shared_attrs = ()
