"""What `export gguf` refuses before reading any weight, each in one line with the reason.

* moecompress's own layout folders (`moecompress_layout.json`: per-layer expert counts or
  per-expert widths): llama.cpp holds ONE expert count and ONE expert width per model;
* GPTQ folders: their weights are packed integers; export the unquantised (or fake-quant)
  checkpoint instead;
* architectures without a llama.cpp mapping (`moecompress.io.gguf.arches`) and settings the
  mapped arch cannot represent (its `check`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moecompress.errors import MoecompressError
from moecompress.io.gguf.arches import GGUFArch, gguf_arch
from moecompress.models.layout import LAYOUT_FILE
from moecompress.models.load import load_config, text_config


def _raw_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def refuse_unexportable(folder: str | Path) -> tuple[Any, GGUFArch]:
    """(config, GGUF arch spec) of a checkpoint export gguf can write; a one-line error otherwise."""
    folder = Path(folder)
    raw = _raw_config(folder)
    if (folder / LAYOUT_FILE).is_file() or "moecompress" in raw:
        raise MoecompressError(f"{folder} is in moecompress's non-uniform layout (per-layer expert counts or "
                               "per-expert widths, moecompress_layout.json); llama.cpp needs one expert count and one "
                               "expert width for every layer: prune with --allocation uniform to export GGUF")
    method = str((raw.get("quantization_config") or {}).get("quant_method", "")).lower()
    if method == "gptq":
        raise MoecompressError(f"{folder} is a GPTQ checkpoint (packed integer weights), which export gguf does not "
                               "read; export the unquantised checkpoint, or the fake-quant one (quantize --format "
                               "fake), and choose a GGUF --type")
    config = text_config(load_config(folder))
    spec = gguf_arch(str(config.model_type))
    spec.check(config)
    return config, spec
