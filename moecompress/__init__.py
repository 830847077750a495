"""moecompress: compress Hugging Face Mixture-of-Experts checkpoints.

`moecompress.load(path, dtype=...)` opens any checkpoint moecompress writes (stock pruned
folders, non-uniform layouts, GPTQ outputs). It is imported lazily so `import moecompress`
stays light (no torch import).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from moecompress.loader import load

        return load
    raise AttributeError(f"module 'moecompress' has no attribute {name!r}")
