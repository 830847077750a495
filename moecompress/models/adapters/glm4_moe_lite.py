"""GLM-4.7-Flash style GLM-MoE-Lite (latent attention): the DeepSeek-V3 router (sigmoid + correction bias + groups).

See deepseek_v3.py for the routing formula and masking argument. MoE layers are the
"sparse" entries of config.mlp_layer_types.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_v3 import DeepseekV3Adapter


@register
class Glm4MoeLiteAdapter(DeepseekV3Adapter):
    model_types = ("glm4_moe_lite",)
