"""GraniteMoE-SWA: GraniteMoE routing and shared MLP with sliding-window attention layers (`layer_types`)."""

from moecompress.models.adapters import register
from moecompress.models.adapters.granitemoe import GraniteMoeAdapter


@register
class GraniteMoeSWAAdapter(GraniteMoeAdapter):
    model_types = ("granitemoe_swa",)
