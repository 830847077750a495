"""dots.llm1 (rednote): the DeepSeek-V3 router (sigmoid + correction bias + groups).

See deepseek_v3.py for the routing formula and masking argument.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_v3 import DeepseekV3Adapter


@register
class Dots1Adapter(DeepseekV3Adapter):
    model_types = ("dots1",)
