"""Shared experts whose width is a multiple of the routed experts' width key.

DeepSeek-derived blocks (and HY-V3, AFMoE, ERNIE-4.5, EXAONE-MoE, ...) build their shared
experts with width moe_intermediate_size x <shared count>. Changing that key to shrink the
routed experts would resize the shared experts too, so uniform neuron pruning of routed
experts is not expressible in a stock config while shared experts exist.
"""

from __future__ import annotations

from typing import Any

from moecompress.errors import MoecompressError


class SharedWidthMixin:
    """Mixin for `MoEAdapter` subclasses: refuse neuron pruning when shared experts share the width key."""

    shared_count_key: str = "n_shared_experts"
    intermediate_size_key: str

    def check_width_patchable(self, config: Any) -> None:
        """Raise when config.<shared_count_key> > 0 (shared experts are sized by the routed width key)."""
        shared = getattr(config, self.shared_count_key, None) or 0
        if shared > 0:
            raise MoecompressError(
                f"{config.model_type}: the shared experts' width is {self.intermediate_size_key} x "
                f"{self.shared_count_key}, so the routed experts' width cannot be changed alone; "
                "prune experts instead of neurons for this architecture"
            )
