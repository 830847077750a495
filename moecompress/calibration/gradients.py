"""Gradients at the activations only: the backward passes of HEAPr and GEMQ need dLoss/d(hidden
states), never the weights' gradients."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from moecompress.engine.backward import frozen_parameters


@contextlib.contextmanager
def activation_gradients(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Freeze every parameter and, when `enabled`, make the input embeddings' output require grad.

    Inside, `loss.backward()` computes gradients for the activations (what the observers' hooks
    read) without allocating a gradient per weight. The parameters' `requires_grad` flags are
    restored on exit. With `enabled=False` only the freezing applies.
    """
    handle = None
    with frozen_parameters(model):
        if enabled:
            handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()
