"""GraniteMoE-Shared: GraniteMoE plus a dense shared MLP on each decoder layer (`shared_intermediate_size`)."""

from moecompress.models.adapters import register
from moecompress.models.adapters.granitemoe import GraniteMoeAdapter


@register
class GraniteMoeSharedAdapter(GraniteMoeAdapter):
    model_types = ("granitemoeshared",)
