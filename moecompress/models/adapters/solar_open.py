"""Solar-Open (Upstage): the DeepSeek-V3 router (sigmoid + correction bias + groups).

See deepseek_v3.py for the routing formula and masking argument. Every decoder layer is MoE;
shared experts are moe_intermediate_size * n_shared_experts wide.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_v3 import DeepseekV3Adapter


@register
class SolarOpenAdapter(DeepseekV3Adapter):
    model_types = ("solar_open",)
