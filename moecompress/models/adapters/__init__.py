"""Registry of model adapters, one per transformers `model_type`.

Each module in this package (other than `base` and `instrument`) defines adapter classes and
registers them with `@register`. Modules are imported on first use, so adding an
architecture is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import CanonicalExpert, MoEAdapter, MoELayerRef, RouterOutput

__all__ = [
    "CanonicalExpert",
    "MoEAdapter",
    "MoELayerRef",
    "RouterOutput",
    "register",
    "get_adapter",
    "supported_model_types",
    "unsupported_model_types",
    "UNSUPPORTED",
]

_REGISTRY: dict[str, type[MoEAdapter]] = {}
_LOADED = False
_INTERNAL = {"base", "instrument"}

# MoE architectures transformers ships that no adapter handles, with the reason.
UNSUPPORTED: dict[str, str] = {}


def register(cls: type[MoEAdapter]) -> type[MoEAdapter]:
    """Class decorator: register an adapter for each of its `model_types`."""
    for model_type in cls.model_types:
        if model_type in _REGISTRY and _REGISTRY[model_type] is not cls:
            raise RuntimeError(f"two adapters registered for model_type {model_type!r}")
        _REGISTRY[model_type] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _INTERNAL:
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def supported_model_types() -> list[str]:
    """Every `model_type` with an adapter, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def unsupported_model_types() -> dict[str, str]:
    """MoE `model_type`s transformers ships that moecompress does not handle, with reasons."""
    _load_all()
    return dict(sorted(UNSUPPORTED.items()))


def get_adapter(config_or_model: Any) -> MoEAdapter:
    """The adapter for a model or config; a clear error for unknown or unsupported types."""
    _load_all()
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]()
    if model_type in UNSUPPORTED:
        raise MoecompressError(f"model_type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")
    raise MoecompressError(
        f"model_type {model_type!r} is not a Mixture-of-Experts architecture moecompress knows; "
        f"supported: {', '.join(sorted(_REGISTRY))}"
    )
