"""Hold one streamed decoder layer's weights in memory while it is quantised.

`load_model(..., streaming=True)` keeps decoder layers on disk: accelerate attaches an
`AlignDevicesHook` with `offload=True` to every submodule that owns tensors, which reads the
weights from its `weights_map` before each forward and drops them to the meta device after.
Quantisation must change a layer's weights and run it several times with the changed weights,
so `materialized(layer)` loads the layer's tensors once, switches its hooks' offloading off
(the hooks then only move inputs), and on exit drops the tensors again and switches
offloading back on. The checkpoint on disk is never modified; a model held in memory passes
through unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _offload_hooks(module: nn.Module) -> list[tuple[nn.Module, object]]:
    """(submodule, hook) for every submodule whose weights accelerate offloads."""
    found = []
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        if hook is not None and getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
            found.append((sub, hook))
    return found


def is_streamed(module: nn.Module) -> bool:
    """True when some of the module's weights live on disk (accelerate offload)."""
    return bool(_offload_hooks(module))


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """Within the context, every weight of `module` is a real CPU tensor that forwards keep."""
    hooks = _offload_hooks(module)
    loaded: list[tuple[nn.Module, str, bool]] = []  # (submodule, tensor name, is_parameter)
    try:
        for sub, hook in hooks:
            for name, param in list(sub.named_parameters(recurse=False)):
                value = hook.weights_map[name]  # type: ignore[attr-defined]
                sub._parameters[name] = nn.Parameter(value.detach().to("cpu", copy=True), requires_grad=False)
                loaded.append((sub, name, True))
            for name, buffer in list(sub.named_buffers(recurse=False)):
                if buffer is not None and buffer.is_meta:
                    try:
                        value = hook.weights_map[name]  # type: ignore[attr-defined]
                    except KeyError:
                        continue
                    sub._buffers[name] = value.detach().to("cpu", copy=True)
                    loaded.append((sub, name, False))
            hook.offload = False  # type: ignore[attr-defined]
        yield module
    finally:
        for sub, name, is_param in loaded:
            if is_param:
                old = sub._parameters[name]
                sub._parameters[name] = nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=False)
            else:
                sub._buffers[name] = torch.empty_like(sub._buffers[name], device="meta")
        for _, hook in hooks:
            hook.offload = True  # type: ignore[attr-defined]
