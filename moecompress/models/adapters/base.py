"""The model-adapter contract: everything moecompress knows about one transformers `model_type`.

Methods (observer, scorers, GPTQ, condensing) never touch architecture names such as `w1`,
`block_sparse_moe` or fused `gate_up_proj`. They see:

* `MoELayerRef`: one MoE block of a loaded model (decoder index, module path, modules);
* `CanonicalExpert`: one routed expert as three linear maps (gate, up, down) plus biases and
  the activation that joins gate and up;
* the router's *real* output (`RouterOutput`), captured from the model's own router module;
* `run_experts`: the routed-experts computation of a layer, with a visitor called once per
  expert on exactly the tokens routed to it (what the observer and GPTQ instrument);
* masking experts in the router (context manager) and physically dropping experts or neurons
  with the router rows, correction biases and config patched.

Most transformers 5 MoE classes share one shape: a block with a router module returning
`(logits (T, E), weights (T, k), index (T, k))` and an experts module decorated with
`@use_experts_implementation` holding fused 3-D parameters. `MoEAdapter` implements the whole
contract for that shape from a few declarative class attributes; an architecture file only
states its names, or overrides a method where the architecture really differs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moecompress.errors import MoecompressError
from moecompress.models.tensors import get_tensor, set_tensor
from moecompress.models.widened_matmul import widened_matmul

# Visitor called by `run_experts` once per expert that received tokens:
# visit(expert, token_idx (N_e,), slot (N_e,), x (N_e, H), act (N_e, I), out (N_e, H), gate (N_e,))
ExpertVisitor = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]



# attribute of an experts module's __dict__ holding the source that serves its experts in groups
EXPERT_SOURCE_ATTR = "_moecompress_expert_groups"

@dataclass
class RouterOutput:
    """What the model's own router produced for a batch of tokens."""

    logits: torch.Tensor  # (T, E) raw router logits (before softmax / sigmoid)
    weights: torch.Tensor  # (T, k) coefficients the block multiplies each chosen expert's output by
    index: torch.Tensor  # (T, k) chosen expert ids


@dataclass
class CanonicalExpert:
    """One routed expert as plain linear maps in `nn.Linear` convention (out, in).

    out = down(act(gate(x), up(x))) with `act` the architecture's gating function
    (SiLU(g) * u for SwiGLU experts, GPT-OSS's clamped variant, ...). Non-gated experts have
    `gate is None` and act(None, u) = activation(u).
    """

    gate: torch.Tensor | None  # (I, H)
    up: torch.Tensor  # (I, H)
    down: torch.Tensor  # (H, I)
    gate_bias: torch.Tensor | None = None  # (I,)
    up_bias: torch.Tensor | None = None  # (I,)
    down_bias: torch.Tensor | None = None  # (H,)
    act: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expert output for inputs x (N, H) -> (N, H)."""
        up = nn.functional.linear(x, self.up, self.up_bias)
        gate = None if self.gate is None else nn.functional.linear(x, self.gate, self.gate_bias)
        assert self.act is not None
        return nn.functional.linear(self.act(gate, up), self.down, self.down_bias)

    @property
    def intermediate_size(self) -> int:
        return self.up.shape[0]


@dataclass
class MoELayerRef:
    """One MoE block in a loaded model."""

    index: int  # decoder layer index
    path: str  # module path of the MoE block, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    shared: list[nn.Module] = field(default_factory=list)

    @property
    def experts_path(self) -> str:
        return self.path + "." + _child_name(self.block, self.experts)

    @property
    def router_path(self) -> str:
        return self.path + "." + _child_name(self.block, self.router)


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    for name, module in parent.named_modules():
        if module is child:
            return name
    raise KeyError("module is not a child of the block")


def _get_attr_path(root: Any, dotted: str) -> Any:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# Ways a router computes logits from its (E, H) weight: F.linear(x, W) or x @ W.T via mm / matmul.
_LOGIT_FUNCS = (nn.functional.linear, torch.mm, torch.matmul, torch.Tensor.__matmul__, torch.Tensor.mm,
                torch.Tensor.matmul)


class _LogitMaskMode(TorchFunctionMode):
    """Adds a mask to the first linear map inside a router that produces E logits.

    Used while a router's forward runs so that masked experts get the most negative logit and
    are never chosen, whatever the routing function (softmax, sigmoid, sparsemixer, top-k
    first). The router's code runs unchanged; only its logits are edited.
    """

    def __init__(self, weight_shape: torch.Size, mask: torch.Tensor) -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.mask = mask  # (E,) bool, True = masked
        self.done = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.done and func in _LOGIT_FUNCS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("mat2", kwargs.get("other")))
            expected = self.weight_shape if func is nn.functional.linear else self.weight_shape[::-1]
            if weight is not None and tuple(weight.shape) == expected:
                self.done = True
                with torch._C.DisableTorchFunction():
                    fill = torch.finfo(out.dtype).min
                    out = out.masked_fill(self.mask.to(out.device), fill)
        return out


_NO_LOGITS_FOUND = "moecompress could not find the router's logit computation to mask"


class _MaskedForward:
    """The forward of a router with logit masks: its previous forward inside one mode per mask.

    Installed on the router instance (on accelerate's `_old_forward` when the router carries an
    accelerate hook, so device placement still happens first) for the duration of a mask
    context. The modes are entered in a `with` block around the forward only, so they are on
    torch's (process-wide) function-mode stack exactly while the router runs and are popped
    however its forward ends (an exception, KeyboardInterrupt). With no masks left it passes
    calls straight through, in case other code wrapped the router's forward after it.
    """

    def __init__(self, previous: Callable[..., Any], replaced: Any | None) -> None:
        self.previous = previous
        self.replaced = replaced  # the router's own __dict__ entry this replaces (None: the class's forward)
        self.__wrapped__ = previous  # inspect.signature sees the router's own signature
        self.masks: dict[int, tuple[torch.Size, torch.Tensor]] = {}
        self._next_key = 0

    def add(self, weight_shape: torch.Size, mask: torch.Tensor) -> int:
        key = self._next_key
        self._next_key += 1
        self.masks[key] = (weight_shape, mask)
        return key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        modes = [_LogitMaskMode(shape, mask) for shape, mask in self.masks.values()]
        with contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            out = self.previous(*args, **kwargs)
        if not all(mode.done for mode in modes):
            raise RuntimeError(_NO_LOGITS_FOUND)
        return out


class _LogitMaskHandle:
    """Removes one logit mask from a router (`remove()`, idempotent); the last restores its forward."""

    def __init__(self, router: nn.Module, attr: str, wrapper: _MaskedForward, key: int) -> None:
        self.router, self.attr, self.wrapper, self.key = router, attr, wrapper, key

    def remove(self) -> None:
        self.wrapper.masks.pop(self.key, None)
        if self.wrapper.masks or self.router.__dict__.get(self.attr) is not self.wrapper:
            return
        if self.wrapper.replaced is None:
            del self.router.__dict__[self.attr]
        else:
            object.__setattr__(self.router, self.attr, self.wrapper.replaced)


class MoEAdapter:
    """Adapter for the common transformers 5 MoE layout; subclass per `model_type`.

    Class attributes an architecture file sets:

    model_types: the `config.model_type` values handled.
    block_attrs: names of the MoE block inside a decoder layer, tried in order.
    router_attr / experts_attr: names of the router and experts modules inside the block.
    router_weight_attr: dotted path (from the router) of the (E, H) logit weight.
    shared_attrs: names of shared-expert modules inside the block (left untouched by pruning).
    expert_count_keys: config keys that hold the routed-expert count (all are patched).
    top_k_key: config key of the number of experts per token.
    intermediate_size_key: config key of the routed experts' width (for neuron dropping).
    correction_bias_paths: dotted paths from the block of score-correction biases with the
        expert axis last (sliced with the router; set to -inf when masking).
    router_bias_attr: dotted path from the router of a logit bias (E,), sliced with the router.
    group_keys: (n_group key, topk_group key) for group-limited routers, or None.
    router_output: "logits_weights_index" (the common 3-tuple) or a custom name handled by an
        override of `route`.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    block_attrs: ClassVar[tuple[str, ...]] = ("mlp",)
    router_attr: ClassVar[str] = "gate"
    experts_attr: ClassVar[str] = "experts"
    router_weight_attr: ClassVar[str] = "weight"
    shared_attrs: ClassVar[tuple[str, ...]] = ()
    expert_count_keys: ClassVar[tuple[str, ...]] = ("num_experts",)
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    intermediate_size_key: ClassVar[str] = "moe_intermediate_size"
    correction_bias_paths: ClassVar[tuple[str, ...]] = ()
    router_bias_attr: ClassVar[str | None] = None
    group_keys: ClassVar[tuple[str, str] | None] = None
    layers_path: ClassVar[str] = "model.layers"
    notes: ClassVar[str] = ""
    # How the router turns logits into combine weights, for `inspect` and the docs:
    # "softmax", "softmax-renorm", "topk-softmax", "sigmoid", "sigmoid-bias-group", "sparsemixer", ...
    routing: ClassVar[str | None] = None
    # Group-limited routers score a group by its best experts (DeepSeek-V3 sums the top two),
    # so each group must keep at least this many experts.
    min_kept_per_group: ClassVar[int] = 1
    # False when decoder layers pass state to the next layer besides the hidden states, so the
    # layer-at-a-time pass (cached hidden states + captured kwargs) cannot replay them.
    layerwise_supported: ClassVar[bool] = True

    @property
    def own_expert_arithmetic(self) -> bool:
        """Whether this adapter computes its experts with its own `run_experts` (not the generic one)."""
        return type(self).run_experts is not MoEAdapter.run_experts
    # False when the adapter's instrumentation holds views of expert weights that disk
    # offloading (streaming) replaces between calls; such models are calibrated in memory.
    streaming_supported: ClassVar[bool] = True

    # ------------------------------------------------------------------ discovery
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a causal-LM model, in order."""
        return _get_attr_path(model, self.layers_path)

    def moe_layers(self, model: nn.Module) -> list[MoELayerRef]:
        """Every MoE block of the model (dense layers are skipped), in decoder order."""
        refs = []
        for index, layer in enumerate(self.decoder_layers(model)):
            for attr in self.block_attrs:
                block = getattr(layer, attr, None)
                if block is None or not self.is_moe_block(block):
                    continue
                router = _get_attr_path(block, self.router_attr)
                experts = _get_attr_path(block, self.experts_attr)
                shared = [getattr(block, a) for a in self.shared_attrs if getattr(block, a, None) is not None]
                refs.append(
                    MoELayerRef(
                        index=index,
                        path=f"{self.layers_path}.{index}.{attr}",
                        block=block,
                        router=router,
                        experts=experts,
                        num_experts=self.router_weight(router).shape[0],
                        top_k=self.top_k(model.config),
                        shared=shared,
                    )
                )
                break
        return refs

    def residual_module(self, model: nn.Module, layer: MoELayerRef) -> nn.Module | None:
        """The module whose INPUT is the residual stream entering the MoE block (h_t in EASY-EP).

        Default: the decoder layer's `post_attention_layernorm`. None means the block's own
        input is used instead.
        """
        decoder_layer = self.decoder_layers(model)[layer.index]
        return getattr(decoder_layer, "post_attention_layernorm", None)

    def is_moe_block(self, block: nn.Module) -> bool:
        """True when `block` is a routed MoE block (not a dense MLP in the same slot)."""
        try:
            _get_attr_path(block, self.router_attr)
            _get_attr_path(block, self.experts_attr)
        except AttributeError:
            return False
        return True

    # ------------------------------------------------------------------ config
    def num_experts(self, config: Any) -> int:
        """Routed experts per MoE layer according to the config."""
        return int(getattr(config, self.expert_count_keys[0]))

    def top_k(self, config: Any) -> int:
        """Experts chosen per token."""
        return int(getattr(config, self.top_k_key))

    def groups(self, config: Any) -> tuple[int, int] | None:
        """(n_group, topk_group) for group-limited routers that actually use groups, else None."""
        if self.group_keys is None:
            return None
        n_group = getattr(config, self.group_keys[0], None)
        topk_group = getattr(config, self.group_keys[1], None)
        if not n_group or n_group <= 1:
            return None
        return int(n_group), int(topk_group)

    def patched_config(self, config: Any, num_experts: int | None = None, intermediate_size: int | None = None) -> Any:
        """A copy of `config` with the routed-expert count and/or expert width replaced."""
        new = copy.deepcopy(config)
        if num_experts is not None:
            for key in self.expert_count_keys:
                if hasattr(new, key):
                    setattr(new, key, int(num_experts))
        if intermediate_size is not None:
            setattr(new, self.intermediate_size_key, int(intermediate_size))
        return new

    # ------------------------------------------------------------------ router
    def router_weight(self, router: nn.Module) -> torch.Tensor:
        """The router's (E, H) logit weight."""
        return _get_attr_path(router, self.router_weight_attr)

    def route(self, layer: MoELayerRef, hidden: torch.Tensor) -> RouterOutput:
        """Run the model's own router on hidden (T, H) and return its real outputs."""
        logits, weights, index = layer.router(hidden)
        return RouterOutput(logits=logits, weights=weights, index=index)

    def router_logits_from_output(self, output: Any) -> torch.Tensor:
        """Raw (T, E) logits from the router module's forward output (for forward hooks)."""
        return output[0]

    @contextlib.contextmanager
    def mask_experts(self, model: nn.Module, keep: dict[int, Sequence[int]]) -> Iterator[None]:
        """Within the context, the router of decoder layer L can only choose experts in keep[L].

        Masked experts get the most negative logit inside the router's own forward, and their
        correction biases are set to -inf, so selection, group scores and renormalisation run
        exactly as in a model where those experts were physically removed.
        """
        handles = []
        saved: list[tuple[nn.Module, str, torch.Tensor]] = []  # (block, bias path, the bias the mask replaced)
        try:
            for layer in self.moe_layers(model):
                if layer.index not in keep:
                    continue
                mask = torch.ones(layer.num_experts, dtype=torch.bool)
                mask[list(keep[layer.index])] = False
                weight_shape = self.router_weight(layer.router).shape
                handles.extend(self._install_logit_mask(layer.router, weight_shape, mask))
                for path in self.correction_bias_paths:
                    bias = get_tensor(layer.block, path)
                    if bias is None:
                        continue
                    # a masked copy stands in for the bias (never written in place: a layer read from the
                    # checkpoint may hold a view of its file)
                    masked = bias.detach().clone()
                    masked[..., mask.to(masked.device)] = float("-inf")
                    saved.append((layer.block, path, bias))
                    set_tensor(layer.block, path, masked)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for block, path, original in reversed(saved):
                set_tensor(block, path, original)

    @staticmethod
    def _install_logit_mask(router: nn.Module, weight_shape: torch.Size, mask: torch.Tensor) -> list[Any]:
        """Mask `router`'s logits while it runs; returns handles whose `remove()` undoes it.

        The router's forward is wrapped (`_MaskedForward`) so that the function mode editing
        its logits lives in a `with` block around the forward: it cannot stay on torch's global
        mode stack when the router raises. A router whose forward computes no (E, H) logit map
        raises RuntimeError rather than running unmasked.
        """
        attr = "_old_forward" if hasattr(router, "_hf_hook") and hasattr(router, "_old_forward") else "forward"
        wrapper = router.__dict__.get(attr)
        if not isinstance(wrapper, _MaskedForward):  # else a nested mask on the same router: add to it
            wrapper = _MaskedForward(getattr(router, attr), replaced=wrapper)
            object.__setattr__(router, attr, wrapper)
        key = wrapper.add(weight_shape, mask)
        return [_LogitMaskHandle(router, attr, wrapper, key)]

    # ------------------------------------------------------------------ experts
    def expert_weights(self, layer: MoELayerRef, expert: int) -> CanonicalExpert:
        """Expert `expert` of `layer` as canonical (gate, up, down) linear maps (views, no copy)."""
        ex = layer.experts
        transposed = bool(getattr(ex, "is_transposed", False))
        concatenated = bool(getattr(ex, "is_concatenated", True))
        has_gate = bool(getattr(ex, "has_gate", True))
        has_bias = bool(getattr(ex, "has_bias", False))

        def as_linear(w: torch.Tensor) -> torch.Tensor:
            return w.transpose(0, 1) if transposed else w

        down = as_linear(ex.down_proj[expert])  # (H, I)
        down_bias = ex.down_proj_bias[expert] if has_bias else None
        if has_gate:
            gate_up = as_linear(ex.gate_up_proj[expert])  # (2I, H)
            gate_up_bias = ex.gate_up_proj_bias[expert] if has_bias else None
            if concatenated:
                gate, up = gate_up.chunk(2, dim=0)
                gate_b, up_b = gate_up_bias.chunk(2) if gate_up_bias is not None else (None, None)
            else:
                gate, up = gate_up[0::2], gate_up[1::2]
                gate_b, up_b = (gate_up_bias[0::2], gate_up_bias[1::2]) if gate_up_bias is not None else (None, None)
        else:
            gate, gate_b = None, None
            up = as_linear(ex.up_proj[expert])
            up_b = ex.up_proj_bias[expert] if has_bias else None
        return CanonicalExpert(
            gate=gate,
            up=up,
            down=down,
            gate_bias=gate_b,
            up_bias=up_b,
            down_bias=down_bias,
            act=self._canonical_act(layer),
        )

    def _canonical_act(self, layer: MoELayerRef) -> Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]:
        ex = layer.experts
        if not getattr(ex, "has_gate", True):
            return lambda gate, up: ex.act_fn(up)
        concatenated = bool(getattr(ex, "is_concatenated", True))

        def act(gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
            if concatenated:
                joined = torch.cat([gate, up], dim=-1)
            else:
                joined = torch.stack([gate, up], dim=-1).flatten(-2)
            return ex._apply_gate(joined)

        return act

    def run_experts(
        self,
        layer: MoELayerRef,
        hidden: torch.Tensor,
        index: torch.Tensor,
        weights: torch.Tensor,
        visit: ExpertVisitor | None = None,
        only: set[int] | None = None,
    ) -> torch.Tensor:
        """The routed experts' combined output for hidden (T, H), index/weights (T, k) -> (T, H).

        Computes each expert only on the tokens routed to it (grouped by expert), in the
        module's own arithmetic, and calls `visit` per expert with its inputs, down_proj
        inputs and outputs, so observers and GPTQ need no second pass. `only`: compute just
        these experts (the combined output then lacks the others' contributions). An experts
        module served in groups (`moecompress.engine.expert_groups`, a layer larger than the
        memory budget) is computed by its source, one group of experts at a time.
        """
        source = layer.experts.__dict__.get(EXPERT_SOURCE_ATTR)
        if source is not None:
            return source.run(self, layer, hidden, index, weights, visit, only)
        ex = layer.experts
        transposed = bool(getattr(ex, "is_transposed", False))
        has_gate = bool(getattr(ex, "has_gate", True))
        has_bias = bool(getattr(ex, "has_bias", False))
        num_tokens, top_k = index.shape
        flat_expert = index.reshape(-1)  # (T*k,)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=layer.num_experts).tolist()
        out = torch.zeros(num_tokens * top_k, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        flat_weights = weights.reshape(-1)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = order[start : start + count]  # (N_e,) positions in the flattened (T*k) list
            start += count
            if only is not None and expert not in only:
                continue
            token_idx = rows // top_k
            slot = rows % top_k
            x = hidden[token_idx]  # (N_e, H)
            # weights kept in a narrower dtype than the activations are widened one expert at a time
            # (under autograd the narrow weight is what backward keeps: `moecompress.models.widened_matmul`)
            w_in = ex.gate_up_proj[expert] if has_gate else ex.up_proj[expert]
            b_in = None
            if has_bias:
                b_in = (ex.gate_up_proj_bias[expert] if has_gate else ex.up_proj_bias[expert]).to(x.dtype)
            proj = widened_matmul(x, w_in, transposed)
            if b_in is not None:
                proj = proj + b_in
            act = ex._apply_gate(proj) if has_gate else ex.act_fn(proj)  # (N_e, I)
            y = widened_matmul(act, ex.down_proj[expert], transposed)
            if has_bias:
                y = y + ex.down_proj_bias[expert].to(x.dtype)
            if getattr(ex, "has_post_expert_norm", False):
                y = ex.post_expert_norm(y)
            gate = flat_weights[rows]
            if visit is not None:
                visit(expert, token_idx, slot, x, act, y, gate)
            out[rows] = (y * gate.unsqueeze(-1)).float()
        combined = out.view(num_tokens, top_k, -1).sum(dim=1)
        return combined.to(hidden.dtype)

    @contextlib.contextmanager
    def instrument(self, model: nn.Module, visitors: dict[int, ExpertVisitor]) -> Iterator[None]:
        """Within the context, layer L's experts run through `run_experts` with visitors[L].

        Uses transformers' experts-implementation registry, so the model's own block code
        (router, shared experts, residual) runs unchanged around the instrumented experts.
        """
        from moecompress.models.adapters.instrument import instrumented_experts

        layers = [ref for ref in self.moe_layers(model) if ref.index in visitors]
        with instrumented_experts(self, layers, visitors):
            yield

    # ------------------------------------------------------------------ surgery
    def expert_weight_names(self, layer: MoELayerRef) -> list[str]:
        """Names (relative to the experts module) of every parameter that stores routed experts' weights or biases.

        The writers that store experts one by one (GPTQ) drop these from the layer's state and
        write each expert's projections from `expert_weights` instead. Fused layouts name them
        `gate_up_proj`, `down_proj`, ...; adapters with their own layout (DBRX: `w1`, `v1`, `w2`)
        are covered too, since every parameter of the experts module holds expert weights.
        """
        return [name for name, _ in layer.experts.named_parameters()]

    def expert_param_names(self, layer: MoELayerRef) -> list[str]:
        """State-dict names (relative to the experts module) of per-expert tensors (expert axis 0)."""
        return self.expert_weight_names(layer) + [
            name for name, _ in layer.experts.named_buffers()
        ]

    def _neuron_axes(self, layer: MoELayerRef) -> dict[str, tuple[int, str]]:
        """Per expert tensor: (axis of the intermediate dim, how gate/up are packed there)."""
        ex = layer.experts
        transposed = bool(getattr(ex, "is_transposed", False))
        concatenated = bool(getattr(ex, "is_concatenated", True))
        packing = "concat" if concatenated else "interleave"
        has_gate = bool(getattr(ex, "has_gate", True))
        axes: dict[str, tuple[int, str]] = {}
        if has_gate:
            axes["gate_up_proj"] = (2 if transposed else 1, packing)
            axes["gate_up_proj_bias"] = (1, packing)
        else:
            axes["up_proj"] = (2 if transposed else 1, "single")
            axes["up_proj_bias"] = (1, "single")
        axes["down_proj"] = (1 if transposed else 2, "single")
        return axes

    def sliced_state_dict(
        self,
        model: nn.Module,
        keep_experts: dict[int, Sequence[int]] | None = None,
        keep_neurons: dict[int, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The model's state dict with experts (and/or neurons) removed.

        keep_experts[L]: expert ids kept in decoder layer L (router rows and correction biases
        follow). keep_neurons[L]: (E_kept, m) neuron ids kept per kept expert (same m for all).
        """
        keep_experts = keep_experts or {}
        keep_neurons = keep_neurons or {}
        state = dict(model.state_dict())
        for layer in self.moe_layers(model):
            experts_idx = keep_experts.get(layer.index)
            if experts_idx is not None:
                ids = torch.as_tensor(list(experts_idx), dtype=torch.long)
                for name in self.expert_param_names(layer):
                    key = f"{layer.experts_path}.{name}"
                    state[key] = state[key].index_select(0, ids).contiguous()
                router_prefix = layer.router_path
                for rel in (self.router_weight_attr, self.router_bias_attr):
                    if rel is None:
                        continue
                    key = f"{router_prefix}.{rel}"
                    if key in state:
                        state[key] = state[key].index_select(0, ids).contiguous()
                for path in self.correction_bias_paths:
                    key = f"{layer.path}.{path}"
                    if key in state:
                        state[key] = state[key].index_select(state[key].dim() - 1, ids).contiguous()
            neurons = keep_neurons.get(layer.index)
            if neurons is not None:
                for name, (axis, packing) in self._neuron_axes(layer).items():
                    key = f"{layer.experts_path}.{name}"
                    if key not in state:
                        continue
                    state[key] = _gather_neurons(state[key], neurons, axis, packing)
        return state

    def drop(
        self,
        model: nn.Module,
        keep_experts: dict[int, Sequence[int]] | None = None,
        keep_neurons: dict[int, torch.Tensor] | None = None,
    ) -> nn.Module:
        """A new model with experts and/or neurons physically removed (input model untouched).

        Uniform plans only: every MoE layer keeps the same number of experts (and neurons),
        because a stock config holds one expert count and one expert width.
        """
        from transformers import AutoModelForCausalLM

        layers = self.moe_layers(model)
        new_count = None
        if keep_experts:
            counts = {len(keep_experts.get(ref.index, range(ref.num_experts))) for ref in layers}
            if len(counts) != 1:
                raise MoecompressError(
                    "non-uniform expert counts per layer cannot be expressed in a stock config; "
                    "use the same number of kept experts in every MoE layer"
                )
            new_count = counts.pop()
            if new_count < self.top_k(model.config):
                raise MoecompressError(
                    f"cannot keep {new_count} experts per layer: the router chooses top_k={self.top_k(model.config)}"
                )
        new_width = None
        if keep_neurons:
            widths = {int(t.shape[-1]) for t in keep_neurons.values()}
            if len(widths) != 1 or len(keep_neurons) != len(layers):
                raise MoecompressError("uniform-width neuron pruning needs the same width in every expert of every layer")
            new_width = widths.pop()
            self.check_width_patchable(model.config)
        state = self.sliced_state_dict(model, keep_experts, keep_neurons)
        config = self.patched_config(model.config, num_experts=new_count, intermediate_size=new_width)
        dtype = next(model.parameters()).dtype
        with torch.device("meta"):
            new_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = new_model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not _is_non_persistent(new_model, k)]
        if missing or unexpected:
            raise MoecompressError(
                f"internal error: pruned state dict does not match the patched config "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        _materialize_non_persistent_buffers(new_model, model)
        if getattr(config, "tie_word_embeddings", False):
            new_model.tie_weights()  # load_state_dict(assign=True) gave the head its own tensor
        new_model.eval()
        return new_model

    def check_width_patchable(self, config: Any) -> None:
        """Raise when the routed-expert width key also sizes other modules (e.g. shared experts)."""
        return None


def _is_non_persistent(model: nn.Module, key: str) -> bool:
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    return name in getattr(module, "_non_persistent_buffers_set", set())


def _materialize_non_persistent_buffers(new_model: nn.Module, old_model: nn.Module) -> None:
    """Copy non-persistent buffers (rotary inv_freq, ...) that load_state_dict does not carry."""
    old_modules = dict(old_model.named_modules())
    for path, module in new_model.named_modules():
        for name in list(getattr(module, "_non_persistent_buffers_set", set())):
            buf = module._buffers.get(name)
            if buf is None or not buf.is_meta:
                continue
            old = old_modules.get(path)
            if old is not None and name in old._buffers and old._buffers[name] is not None:
                module._buffers[name] = old._buffers[name].clone()


def _gather_neurons(tensor: torch.Tensor, neurons: torch.Tensor, axis: int, packing: str) -> torch.Tensor:
    """Keep neurons[e] (m,) of each expert e along `axis` of an (E, ...) tensor."""
    neurons = neurons.long()
    if packing == "concat":
        half = tensor.shape[axis] // 2
        index = torch.cat([neurons, neurons + half], dim=1)  # (E, 2m)
    elif packing == "interleave":
        index = torch.stack([2 * neurons, 2 * neurons + 1], dim=-1).flatten(1)  # (E, 2m)
    else:
        index = neurons
    shape = [1] * tensor.dim()
    shape[0] = index.shape[0]
    shape[axis] = index.shape[1]
    index = index.view(shape).expand(*[tensor.shape[d] if d not in (0, axis) else shape[d] for d in range(tensor.dim())])
    return torch.gather(tensor, axis, index).contiguous()

