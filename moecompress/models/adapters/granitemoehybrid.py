"""GraniteMoE-Hybrid (Granite 4): Mamba-2 and attention layers, each with a GraniteMoE block and a shared MLP.

The Mamba mixer's width comes from `mamba_expand`, not `intermediate_size`, so the routed
experts' width can be patched alone. A config with `num_local_experts == 0` has no MoE block.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.granitemoe import GraniteMoeAdapter


@register
class GraniteMoeHybridAdapter(GraniteMoeAdapter):
    model_types = ("granitemoehybrid",)
