"""Where an artifact came from: the model config's hash and the library versions, recorded in every output.

`config_hash` is a sha256 over the config's semantic fields, so statistics, patterns and
plans refuse to be applied to a different model; fields that do not change what the weights
compute (dtype, transformers version, runtime flags) are left out.
"""

from __future__ import annotations

import hashlib
import json
import platform
from typing import Any

import torch

# Config keys that do not change what the weights compute.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "use_cache", "_commit_hash",
     "_experts_implementation", "_attn_implementation", "output_router_logits", "quantization_config",
     "moecompress"}
)


def config_hash(config: Any) -> str:
    """sha256 over the config's semantic fields (dtype, version and runtime flags excluded)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    clean = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    blob = json.dumps(clean, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine the numbers (recorded in every artifact)."""
    import accelerate
    import safetensors
    import transformers

    import moecompress

    return {
        "moecompress": moecompress.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
