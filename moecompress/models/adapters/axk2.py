"""A.X-K2 (SK Telecom): DeepSeek-V3 style sigmoid router, groups optional.

Routing as in deepseek_v3.py, except that groups are used only when config.n_group is set,
and experts outside the chosen groups get a choice score of 0 (not -inf) before the final
top-k. Masking keeps a masked expert at -inf inside the chosen groups; in the reference code a
kept expert whose score + bias is negative can lose to a 0-filled expert of another group, in
which case the masked and dropped models may pick different 0-filled experts. Kept experts
usually score above 0 (sigmoid in (0, 1) plus a small bias); checkpoints without groups are
unaffected.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.deepseek_v3 import DeepseekV3Adapter


@register
class AXK2Adapter(DeepseekV3Adapter):
    model_types = ("axk2",)
