"""Fake-quant checkpoints: dequantised weights in the original dtype, loadable by plain transformers.

Written one decoder layer at a time while quantisation runs (`on_layer`), in transformers'
own on-disk layout: each layer's in-memory state dict goes through
`transformers.core_model_loading.revert_weight_conversion`, the function `save_pretrained`
uses, so fused experts are written back as the architecture's per-expert or fused keys and
`from_pretrained` loads the folder with no custom code. No memory is saved on disk; the format
exists to measure the quality of a quantisation plan with any transformers tooling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecompress.models.adapters.base import MoEAdapter
from moecompress.quant.apply import LayerResult
from moecompress.io.safetensors_stream import ShardWriter


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict names that are tied copies of another parameter (not written)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    params = dict(model.named_parameters(remove_duplicate=False))
    return {target for target, source in dict(tied).items()
            if target in params and source in params and params[target] is params[source]}


def non_layer_state(model: nn.Module, adapter: MoEAdapter) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor outside the decoder layers (embeddings, final norm, head), tied ones once."""
    prefix = adapter.layers_path + "."
    skip = tied_keys(model)
    return {name: tensor for name, tensor in model.state_dict().items()
            if not name.startswith(prefix) and name not in skip}


class FakeQuantWriter:
    """Writes a dequantised checkpoint while `quantize_model` walks the layers."""

    def __init__(self, folder: str | Path, model: nn.Module, adapter: MoEAdapter, dtype: torch.dtype,
                 max_shard_bytes: int = 2 * 10**9) -> None:
        self.folder = Path(folder)
        self.model = model
        self.adapter = adapter
        self.dtype = dtype
        self.shards = ShardWriter(self.folder, max_shard_bytes)

    def _add(self, state: dict[str, torch.Tensor]) -> None:
        from transformers.core_model_loading import revert_weight_conversion

        cast = {name: t.to(self.dtype) if t.is_floating_point() else t for name, t in state.items()}
        self.shards.add_all(revert_weight_conversion(self.model, cast))

    def on_layer(self, index: int | None, result: LayerResult) -> None:
        """Callback for `quantize_model`: write decoder layer `index` (None: everything else)."""
        if index is None:
            self._add(non_layer_state(self.model, self.adapter))
            return
        layer = self.adapter.decoder_layers(self.model)[index]
        self._add(layer.state_dict(prefix=f"{self.adapter.layers_path}.{index}."))

    def state(self) -> dict[str, Any]:
        """What `restore` needs to continue writing in a resumed run (taken between layers)."""
        return {"shards": self.shards.state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue as the writer whose `state()` this is."""
        self.shards.restore(state["shards"])

    def finish(self) -> list[Path]:
        """Close the shards and write config.json (dtype = the output dtype); returns the weight files."""
        files = self.shards.finish()
        config = self.model.config
        saved_dtype = getattr(config, "dtype", None)
        config.dtype = self.dtype
        try:
            config.save_pretrained(self.folder)
        finally:
            config.dtype = saved_dtype
        generation = getattr(self.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(self.folder)
        return files
