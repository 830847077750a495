"""GLM-4.5 / GLM-4.6 MoE: the DeepSeek-V3 router (sigmoid + correction bias + groups).

See deepseek_v3.py for the routing formula; GLM-4-MoE ships n_group=1 (no groups) but the
router code is group-aware, so group-limited configs are handled too.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_v3 import DeepseekV3Adapter


@register
class Glm4MoeAdapter(DeepseekV3Adapter):
    model_types = ("glm4_moe",)
