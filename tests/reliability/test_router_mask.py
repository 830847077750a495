"""The expert mask edits router logits only while the router runs, never torch's state after.

The mask is a `TorchFunctionMode`, which lives on torch's process-wide mode stack. It used to
be entered in a forward pre-hook and left in a forward post-hook, so a router that raised in
between left the mode on the stack for good: every later `F.linear` with the router's weight
shape was silently masked, anywhere in the process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from moecompress.models.adapters import get_adapter
from moecompress.models.adapters.base import MoEAdapter
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model

E, H = 8, 16


def mode_stack() -> list:
    return list(_get_current_function_mode_stack())


def plain_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T without any function that the mask looks at."""
    return (x.unsqueeze(1) * weight.unsqueeze(0)).sum(-1)


def assert_unmasked_math(weight: torch.Tensor) -> None:
    """A later plain computation with the router's weight shape is not edited."""
    x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = plain_logits(x, weight)
        assert torch.allclose(nn.functional.linear(x, weight), expected, atol=1e-5)
        assert torch.allclose(x @ weight.T, expected, atol=1e-5)


class ToyRouter(nn.Module):
    """Logits then top-k; raises `error` after computing the logits when set."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, H, generator=torch.Generator().manual_seed(0)))
        self.error: BaseException | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(x, self.weight)
        if self.error is not None:
            raise self.error
        return logits, logits.topk(2, dim=-1).indices


def masked(keep: list[int]) -> torch.Tensor:
    mask = torch.ones(E, dtype=torch.bool)
    mask[keep] = False
    return mask


@pytest.mark.parametrize("error", [RuntimeError("router failed"), KeyboardInterrupt()])
def test_router_raising_inside_the_mask_leaves_the_mode_stack_alone(error: BaseException) -> None:
    router = ToyRouter()
    before = mode_stack()
    x = torch.randn(6, H)
    handles = MoEAdapter._install_logit_mask(router, router.weight.shape, masked([0, 1]))
    try:
        router.error = error
        with pytest.raises(type(error)):
            router(x)
        assert mode_stack() == before  # not only after the context: right after the failed call
        assert_unmasked_math(router.weight)
        router.error = None
        with torch.no_grad():
            logits, index = router(x)  # the mask still works on the next call
        assert set(index.flatten().tolist()) <= {0, 1}
        assert torch.all(logits[:, 2:] == torch.finfo(logits.dtype).min)
    finally:
        for handle in handles:
            handle.remove()
    assert mode_stack() == before
    assert "forward" not in router.__dict__, "the router's own forward is back"
    with torch.no_grad():
        logits, _ = router(x)
    assert torch.allclose(logits, plain_logits(x, router.weight), atol=1e-5)


def test_real_router_raising_inside_mask_experts() -> None:
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[0]
    hidden = model.config.hidden_size
    before = mode_stack()
    with torch.no_grad(), adapter.mask_experts(model, {layer.index: [0, 1, 2, 3]}):
        with pytest.raises(RuntimeError):
            layer.router(torch.randn(4, hidden + 1))  # wrong width: the router's linear map raises
        assert mode_stack() == before
        assert_unmasked_math(adapter.router_weight(layer.router))
        _, _, index = layer.router(torch.randn(4, hidden))
        assert set(index.flatten().tolist()) <= {0, 1, 2, 3}
    assert mode_stack() == before
    assert_unmasked_math(adapter.router_weight(layer.router))
    assert "forward" not in layer.router.__dict__


def test_mask_is_on_the_stack_only_while_the_router_runs() -> None:
    router = ToyRouter()
    seen: list[int] = []
    router.register_forward_pre_hook(lambda module, args: seen.append(len(mode_stack())))
    router.register_forward_hook(lambda module, args, out: seen.append(len(mode_stack())))
    handles = MoEAdapter._install_logit_mask(router, router.weight.shape, masked([2, 3]))
    try:
        assert mode_stack() == []
        with torch.no_grad():
            router(torch.randn(3, H))
        assert seen == [0, 0] and mode_stack() == []
    finally:
        for handle in handles:
            handle.remove()


def test_nested_masks_on_one_router_removed_in_any_order() -> None:
    router = ToyRouter()
    x = torch.randn(10, H)
    outer = MoEAdapter._install_logit_mask(router, router.weight.shape, masked([0, 1, 2, 3]))
    inner = MoEAdapter._install_logit_mask(router, router.weight.shape, masked([2, 3, 4, 5]))
    with torch.no_grad():
        _, index = router(x)
    assert set(index.flatten().tolist()) <= {2, 3}, "both masks apply"
    for handle in outer:
        handle.remove()
    with torch.no_grad():
        _, index = router(x)
    assert set(index.flatten().tolist()) <= {2, 3, 4, 5}
    for handle in inner + inner:  # removing twice is harmless
        handle.remove()
    assert "forward" not in router.__dict__ and mode_stack() == []


def test_router_without_logits_still_fails_loudly_and_cleanly() -> None:
    router = ToyRouter()
    handles = MoEAdapter._install_logit_mask(router, torch.Size((E + 1, H)), torch.zeros(E + 1, dtype=torch.bool))
    try:
        with pytest.raises(RuntimeError, match="could not find the router's logit computation"):
            router(torch.randn(2, H))
        assert mode_stack() == []
    finally:
        for handle in handles:
            handle.remove()


def test_mask_under_an_accelerate_hook() -> None:
    hooks = pytest.importorskip("accelerate.hooks")
    router = ToyRouter()
    hooks.add_hook_to_module(router, hooks.ModelHook())
    hooked_forward = router.__dict__["_old_forward"]
    x = torch.randn(10, H)
    handles = MoEAdapter._install_logit_mask(router, router.weight.shape, masked([6, 7]))
    try:
        with torch.no_grad():
            _, index = router(x)
        assert set(index.flatten().tolist()) <= {6, 7}
    finally:
        for handle in handles:
            handle.remove()
    assert router.__dict__["_old_forward"] is hooked_forward and mode_stack() == []
    hooks.remove_hook_from_module(router)
