"""Llama 4 text model: sigmoid-scored top-k router whose score scales the expert's *input*.

Llama4TextMoe (`feed_forward` on the layers listed in `moe_layers`) does

    scores, logits = router(x)           # scores (T, E): sigmoid(logit) on the top-k, 0 elsewhere
    y = shared_expert(x) + sum_e f_e(scores[:, e] * x)

with every expert run densely on all T tokens (unchosen ones get a zero input, and a SwiGLU
expert without biases maps 0 to 0). So the coefficient the block multiplies an expert's
*output* by is 1, and the score belongs to the expert's input. This adapter states the
computation that way, which is exact:

* `route` returns weights of 1 and the router's own top-k index; `scores_from_route` gives
  the sigmoid scores that scale the inputs;
* under `instrument`, each expert runs on exactly the rows the model feeds it
  (score * x, taken from the dense input the block builds) through `run_experts`, with gate 1,
  and its output is put back where the block sums it; the block's own code runs unchanged;
* `Llama4TextExperts` has no `(hidden, index, weights)` interface and no layout flags, so each
  layer reference carries `Llama4RoutedExperts`, a view that shares the module's parameters
  (transposed (E, H, 2I) / (E, I, H), gate and up concatenated) and computes routed tokens with
  the module's own dense arithmetic.

The shared expert is sized by `intermediate_size`, the routed experts' key (dense layers use
`intermediate_size_mlp`), so uniform neuron dropping cannot be saved as a stock config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.models.adapters import register
from moecompress.models.adapters.base import ExpertVisitor, MoEAdapter, MoELayerRef, RouterOutput


class Llama4RoutedExperts(nn.Module):
    """A routed-experts view of `Llama4TextExperts` with the common transformers 5 interface.

    Reads the wrapped module's parameters on every access (so in-place writes reach the model,
    and weights that accelerate swaps in while offloading are the ones used) and carries the
    layout flags the base adapter reads. Not part of the model's module tree.
    """

    is_transposed = True
    is_concatenated = True
    has_gate = True
    has_bias = False
    has_post_expert_norm = False

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.__dict__["module"] = experts  # the model's own module, deliberately not registered as a child

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self.module.gate_up_proj  # (E, H, 2I)

    @property
    def down_proj(self) -> torch.Tensor:
        return self.module.down_proj  # (E, I, H)

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def act_fn(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' activation (SiLU in released checkpoints)."""
        return self.module.act_fn(x)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """up * act(gate) for gate_up (N, 2I) -> (N, I), in the module's own order of operations."""
        gate, up = gate_up.chunk(2, dim=-1)
        return up * self.module.act_fn(gate)

    def forward(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j weights[t, j] * f_{index[t, j]}(hidden[t]) for hidden (T, H), index/weights (T, k) -> (T, H).

        Runs the wrapped module itself on the dense (E * T, H) input it expects, with each token
        placed in the rows of its chosen experts and zeros elsewhere.
        """
        num_tokens, hidden_size = hidden.shape
        tokens = torch.arange(num_tokens, device=hidden.device)
        dense = hidden.new_zeros(self.num_experts, num_tokens, hidden_size)  # (E, T, H)
        for j in range(index.shape[1]):
            dense[index[:, j], tokens] = hidden
        dense_out = self.module(dense.view(-1, hidden_size)).view(self.num_experts, num_tokens, hidden_size)
        chosen = dense_out[index, tokens[:, None]]  # (T, k, H)
        return (chosen * weights.unsqueeze(-1)).sum(dim=1)


class Llama4LayerRef(MoELayerRef):
    """A layer reference whose `experts` is a `Llama4RoutedExperts` view, not the block's child."""

    @property
    def experts_path(self) -> str:
        module = self.experts.module
        name = next(name for name, child in self.block.named_children() if child is module)
        return f"{self.path}.{name}"


@register
class Llama4TextAdapter(MoEAdapter):
    model_types = ("llama4_text",)
    routing = "topk-sigmoid, score scales the expert input"
    block_attrs = ("feed_forward",)
    router_attr = "router"
    shared_attrs = ("shared_expert",)
    expert_count_keys = ("num_local_experts",)
    intermediate_size_key = "intermediate_size"

    def moe_layers(self, model: nn.Module) -> list[MoELayerRef]:
        """MoE blocks, each with a `Llama4RoutedExperts` view of its experts."""
        refs = []
        for ref in super().moe_layers(model):
            values = {f.name: getattr(ref, f.name) for f in fields(ref)}
            values["experts"] = Llama4RoutedExperts(ref.experts)
            refs.append(Llama4LayerRef(**values))
        return refs

    def route(self, layer: MoELayerRef, hidden: torch.Tensor) -> RouterOutput:
        """The router's logits and top-k; weights are 1 because the score scales the input, not the output."""
        _, logits = layer.router(hidden)  # (T, E) scores, (T, E) logits
        index = self._top_k_index(layer, logits)
        weights = torch.ones(index.shape, dtype=hidden.dtype, device=hidden.device)
        return RouterOutput(logits=logits, weights=weights, index=index)

    def scores_from_route(self, layer: MoELayerRef, route: RouterOutput) -> torch.Tensor:
        """(T, k) sigmoid scores that multiply the chosen experts' inputs."""
        return torch.sigmoid(route.logits.gather(1, route.index).float()).to(route.logits.dtype)

    @staticmethod
    def _top_k_index(layer: MoELayerRef, logits: torch.Tensor) -> torch.Tensor:
        # the router's own selection: top-k of the logits along the expert axis
        return torch.topk(logits, layer.top_k, dim=1).indices  # (T, k)

    def router_logits_from_output(self, output: Any) -> torch.Tensor:
        """Llama4Router returns (scores, logits): the logits come second."""
        return output[1]

    @contextlib.contextmanager
    def instrument(self, model: nn.Module, visitors: dict[int, ExpertVisitor]) -> Iterator[None]:
        """Within the context, layer L's experts compute through `run_experts` with visitors[L].

        The block's code runs unchanged; its experts module is given a forward that takes the
        dense (E * T, H) input the block built, runs each expert only on its routed rows and
        returns the dense output (zeros for unchosen rows) the block sums over experts.
        """
        restores: list[Callable[[], None]] = []
        try:
            for layer in self.moe_layers(model):
                if layer.index not in visitors:
                    continue
                captured: dict[str, torch.Tensor] = {}

                def keep_logits(module: nn.Module, args: Any, output: Any, _captured=captured) -> None:
                    _captured["hidden"] = args[0]  # (T, H) the block's input
                    _captured["logits"] = output[1]  # (T, E)

                handle = layer.router.register_forward_hook(keep_logits)
                restores.append(handle.remove)
                forward = self._instrumented_forward(layer, captured, visitors[layer.index])
                restores.append(_replace_forward(layer.experts.module, forward))
            yield
        finally:
            for restore in reversed(restores):
                restore()

    def _instrumented_forward(
        self, layer: MoELayerRef, captured: dict[str, torch.Tensor], visit: ExpertVisitor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(routed_in: torch.Tensor) -> torch.Tensor:
            logits = captured.pop("logits", None)
            hidden = captured.pop("hidden", None)
            if logits is None or hidden is None:
                raise RuntimeError("Llama4 experts ran without their router inside an instrument() context")
            hidden_size = routed_in.shape[-1]
            dense_in = routed_in.view(layer.num_experts, -1, hidden_size)  # (E, T, H): row (e, t) = score * x_t
            num_tokens = dense_in.shape[1]
            tokens = torch.arange(num_tokens, device=routed_in.device)
            index = self._top_k_index(layer, logits.view(num_tokens, -1))  # (T, k)
            ones = torch.ones(num_tokens, 1, dtype=routed_in.dtype, device=routed_in.device)
            dense_out = torch.zeros_like(dense_in)
            combined = torch.zeros_like(dense_in[0])  # (T, H) the routed experts' sum the block adds
            for j in range(index.shape[1]):
                slot_index = index[:, j : j + 1]  # (T, 1)
                scaled = dense_in[index[:, j], tokens]  # (T, H): the input the model feeds expert index[t, j]
                out = self.run_experts(layer, scaled, slot_index, ones, _with_slot(visit, j))
                dense_out[index[:, j], tokens] = out
                combined += out
            finish = getattr(visit, "finish", None)
            if finish is not None:
                weights = torch.ones(index.shape, dtype=combined.dtype, device=combined.device)
                finish(hidden.reshape(num_tokens, hidden_size), index, weights, combined)
            return dense_out.view(-1, hidden_size)

        return forward

    def expert_param_names(self, layer: MoELayerRef) -> list[str]:
        """State-dict names (relative to the experts module) of per-expert tensors."""
        return [name for name, _ in layer.experts.module.named_parameters()]

    def check_width_patchable(self, config: Any) -> None:
        """The shared expert is sized by `intermediate_size` too: one key cannot give two widths."""
        raise MoecompressError(
            "llama4_text sizes its shared expert and its routed experts with the same intermediate_size; "
            "uniform neuron pruning cannot be saved as a stock config: prune whole experts instead"
        )


def _with_slot(visit: ExpertVisitor | None, slot: int) -> ExpertVisitor | None:
    """A visitor that reports `slot` for calls made on one top-k slot at a time."""
    if visit is None:
        return None

    def wrapped(expert, token_idx, _slot, x, act, out, gate):  # noqa: ANN001, ANN202
        visit(expert, token_idx, torch.full_like(token_idx, slot), x, act, out, gate)

    return wrapped


def _replace_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[[], None]:
    """Give `module` a new forward (under accelerate's hook when it has one); returns the undo."""
    attr = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
    missing = object()
    previous = module.__dict__.get(attr, missing)
    object.__setattr__(module, attr, forward)

    def restore() -> None:
        if previous is missing:
            del module.__dict__[attr]
        else:
            object.__setattr__(module, attr, previous)

    return restore
