"""A model's parameters and buffers by state-dict name: read one, or put another tensor in its place."""

from __future__ import annotations

import torch
from torch import nn


def get_tensor(model: nn.Module, key: str) -> torch.Tensor | None:
    """The parameter or buffer named `key` in the model's state dict, or None."""
    prefix, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        return None
    if name in module._parameters:
        return module._parameters[name]
    return module._buffers.get(name)


def set_tensor(model: nn.Module, key: str, value: torch.Tensor, requires_grad: bool | None = None) -> None:
    """Replace the parameter or buffer named `key` by `value` (a Parameter keeps being one).

    An `nn.Parameter` value is stored as it is (tying two names to one parameter); a plain
    tensor becomes a Parameter with `requires_grad` (None: the replaced parameter's).
    """
    prefix, _, name = key.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    if name in module._parameters:
        if isinstance(value, nn.Parameter):
            module._parameters[name] = value
            return
        old = module._parameters[name]
        if requires_grad is None:
            requires_grad = bool(old.requires_grad) if old is not None else False
        module._parameters[name] = nn.Parameter(value, requires_grad=requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise KeyError(f"{key} is neither a parameter nor a buffer")
