"""Choosing what to condense: the kept experts of each MoE layer, then which layers (CD-MoE).

Condense, Don't Just Prune (arXiv 2412.00069), as its reference code does it (beam width 1):

1. per MoE layer, add experts one at a time, each time the one whose condensed layer
   (fixed experts S, fixed weights wbar_e) gives the smallest divergence of that decoder
   layer's output from the original's;
2. with each layer's experts fixed, add layers one at a time, each time the one that,
   condensed together with the layers already chosen, gives the smallest divergence of the
   last decoder layer's output hidden states.

The paper's divergence (criterion "js") is the Jensen-Shannon divergence between softmax over
the hidden dimension of the two hidden states, averaged over tokens:
    JS(a, b) = 1/2 KL(p || m) + 1/2 KL(q || m),  p = softmax(a), q = softmax(b), m = (p + q) / 2.

The cheap default (criterion "recon") chooses experts by the reconstruction error of the
routed-experts output on the cached inputs of the experts module,
    err(S) = sum_t || y_t - sum_{e in S} wbar_e f_e(x_t) ||^2,   y_t = sum_{j in K_t} g_{j,t} f_j(x_t),
computed from sufficient statistics gathered in ONE pass over the calibration tokens,
    G_ab = sum_t <f_a(x_t), f_b(x_t)>,  c_a = sum_t <f_a(x_t), y_t>,  Y = sum_t ||y_t||^2,
    err(S) = Y - 2 sum_{a in S} wbar_a c_a + sum_{a, b in S} wbar_a wbar_b G_ab,
so a greedy step costs O(E) scalar updates. Shared experts, their gates and anything else in
the block besides the routed experts are the same in both forms and cancel. Layers are then
chosen by the relative squared error of the last decoder layer's output,
    sum_t ||h'_t - h_t||^2 / sum_t ||h_t||^2.

wbar_e = sum of the gates the block passes to its experts module for e / N_e, read from the
same calibration pass (equal to the observer's soft_count / count on the same tokens).
Everything runs on cached hidden states through `LayerEngine`: the layer search restarts
at each candidate layer from cached inputs instead of re-running the whole model.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moecompress.engine.layers import LayerEngine
from moecompress.condense.apply import compute_dtype, moe_layer_map, swapped_experts
from moecompress.condense.cd_moe import CondensedExperts, check_condensable, condense_layer
from moecompress.condense.plan import CRITERIA, CondensePlan
from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef

log = logging.getLogger(__name__)

Hidden = list[torch.Tensor]  # one (B, S, H) tensor per calibration batch
Divergence = Callable[[Hidden, Hidden], float]


# ---------------------------------------------------------------------------------------------
# divergences between hidden states


def relative_squared_error(reference: Hidden, other: Hidden) -> float:
    """sum ||other - reference||^2 / sum ||reference||^2 over every token of every batch."""
    num = sum(float((o.float() - r.float()).pow(2).sum()) for r, o in zip(reference, other))
    den = sum(float(r.float().pow(2).sum()) for r in reference)
    return num / max(den, 1e-30)


def js_divergence(reference: Hidden, other: Hidden) -> float:
    """Mean over tokens of JS(softmax(reference_t), softmax(other_t)), softmax over the hidden dim."""
    total, tokens = 0.0, 0
    for r, o in zip(reference, other):
        log_p = torch.log_softmax(r.float().reshape(-1, r.shape[-1]), dim=-1)  # (T, H)
        log_q = torch.log_softmax(o.float().reshape(-1, o.shape[-1]), dim=-1)
        log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0))
        kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)  # (T,)
        kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
        total += float((0.5 * (kl_pm + kl_qm)).sum())
        tokens += log_p.shape[0]
    return total / max(tokens, 1)


DIVERGENCES: dict[str, Divergence] = {"recon": relative_squared_error, "js": js_divergence}


# ---------------------------------------------------------------------------------------------
# routing statistics of one layer (one pass)


@dataclass
class LayerRouting:
    """Per-expert routing sums of one MoE layer over the calibration tokens (float64)."""

    count: torch.Tensor  # (E,) N_e: (token, slot) pairs routed to e
    gate_sum: torch.Tensor  # (E,) sum of the gates passed to the experts module for e
    tokens: int = 0
    gram: torch.Tensor | None = None  # (E, E) G_ab = sum_t <f_a(x_t), f_b(x_t)>
    cross: torch.Tensor | None = None  # (E,) c_a = sum_t <f_a(x_t), y_t>
    target_sq: float = 0.0  # Y = sum_t ||y_t||^2

    def mean_gate(self) -> torch.Tensor:
        """(E,) wbar_e = gate_sum / count, 0 for experts no token was routed to."""
        return torch.where(self.count > 0, self.gate_sum / self.count.clamp(min=1), torch.zeros_like(self.gate_sum))


class ExpertsTap:
    """Forward hook (with kwargs) on an experts module: accumulates a `LayerRouting`.

    Reads (hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) as the block passes them and
    the module's output y (T, H). With `gram`, also runs every expert on every token (in token
    chunks of about `chunk_bytes` of expert outputs) for G, c and Y.
    """

    def __init__(self, adapter: MoEAdapter, layer: MoELayerRef, gram: bool, chunk_bytes: int = 256 * 1024**2) -> None:
        self.layer = layer
        num = layer.num_experts
        self.routing = LayerRouting(count=torch.zeros(num, dtype=torch.float64),
                                    gate_sum=torch.zeros(num, dtype=torch.float64))
        self.canonical = [adapter.expert_weights(layer, e) for e in range(num)] if gram else None
        if gram:
            self.routing.gram = torch.zeros(num, num, dtype=torch.float64)
            self.routing.cross = torch.zeros(num, dtype=torch.float64)
        self.chunk_bytes = chunk_bytes
        try:
            self.signature: inspect.Signature | None = inspect.signature(layer.experts.forward)
        except (TypeError, ValueError):
            self.signature = None

    def _bind(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values: list[Any] = list(args)
        if kwargs:
            if self.signature is None:
                raise RuntimeError("cannot read the experts module's keyword arguments")
            values = list(self.signature.bind(*args, **kwargs).arguments.values())
        if len(values) < 3:
            raise RuntimeError("the experts module was not called as experts(hidden, top_k_index, top_k_weights)")
        return values[0], values[1], values[2]

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden, index, weights = self._bind(args, kwargs)
        y = output[0] if isinstance(output, tuple) else output  # (T, H)
        r = self.routing
        flat_index = index.reshape(-1).long()  # (T*k,)
        r.count += torch.bincount(flat_index, minlength=r.count.numel()).double()
        r.gate_sum += torch.bincount(flat_index, weights=weights.reshape(-1).double(), minlength=r.count.numel())
        r.tokens += hidden.numel() // hidden.shape[-1]
        if self.canonical is not None:
            self._accumulate_gram(hidden.reshape(-1, hidden.shape[-1]), y.reshape(-1, y.shape[-1]).float())

    def _accumulate_gram(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """G += F F^T, c += F y, Y += ||y||^2 with F (E, T_c, H) the expert outputs on a token chunk."""
        r = self.routing
        num, hidden_size = len(self.canonical), x.shape[-1]
        chunk = max(1, self.chunk_bytes // (4 * num * hidden_size))
        for start in range(0, x.shape[0], chunk):
            xc, yc = x[start : start + chunk], y[start : start + chunk]  # (T_c, H)
            outs = torch.stack([e.forward(xc).float() for e in self.canonical]).reshape(num, -1)  # (E, T_c*H)
            r.gram += (outs @ outs.T).double()
            r.cross += (outs @ yc.reshape(-1)).double()
            r.target_sq += float(yc.pow(2).sum())


# ---------------------------------------------------------------------------------------------
# greedy expert choice


def greedy_by_reconstruction(routing: LayerRouting, count: int) -> tuple[list[int], list[float]]:
    """Experts added one at a time by smallest err(S) (module docstring); returns (experts, err/Y per step).

    Only experts that received tokens are candidates (wbar is undefined for the others).
    """
    assert routing.gram is not None and routing.cross is not None
    weights = routing.mean_gate()  # (E,)
    available = routing.count > 0
    _check_enough(int(available.sum()), count)
    gram, cross = routing.gram, routing.cross
    target = max(routing.target_sq, 1e-30)
    error = routing.target_sq
    running = torch.zeros_like(cross)  # (E,) sum_{s in S} wbar_s G_{e,s}
    chosen: list[int] = []
    steps: list[float] = []
    for _ in range(count):
        # err(S + e) = err(S) - 2 w_e c_e + 2 w_e sum_s w_s G_es + w_e^2 G_ee
        delta = -2 * weights * cross + 2 * weights * running + weights.pow(2) * torch.diagonal(gram)  # (E,)
        delta = delta.masked_fill(~available, float("inf"))
        if chosen:
            delta[chosen] = float("inf")
        best = int(torch.argmin(delta))
        error += float(delta[best])
        running += weights[best] * gram[:, best]
        chosen.append(best)
        steps.append(error / target)
    return chosen, steps


def _check_enough(available: int, count: int) -> None:
    if available < count:
        raise MoecompressError(f"only {available} experts of a layer received calibration tokens, fewer than "
                               f"--experts {count}; use more calibration data or fewer experts")


# ---------------------------------------------------------------------------------------------
# cached decoder


class CachedDecoder:
    """The decoder over cached calibration batches, restartable at any layer (wraps `LayerEngine`)."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter, batches: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.runner = LayerEngine(model, adapter)
        self.runner.prepare(batches)
        self.num_layers = len(self.runner.layers)
        self.layer_passes = 0  # decoder-layer passes over all cached batches (the search's cost unit)

    def inputs(self) -> Hidden:
        """The cached inputs of the next layer to run, one (B, S, H) per batch."""
        return [hidden for _, hidden in self.runner.layer_inputs()]

    @torch.no_grad()
    def run(self, start: int, stop: int, hidden: Hidden) -> Hidden:
        """Outputs of layers start..stop-1 run on `hidden` (the inputs of layer `start`)."""
        self.runner.restart(start, hidden)
        for index in range(start, stop):
            self.runner.run_layer(index)
            self.layer_passes += 1
        return self.inputs()


def greedy_by_divergence(decoder: CachedDecoder, layer: MoELayerRef, inputs: Hidden, reference: Hidden,
                         routing: LayerRouting, count: int, divergence: Divergence, dtype: torch.dtype
                         ) -> tuple[list[int], list[float]]:
    """Experts added one at a time by smallest divergence of the decoder layer's output (the paper's search)."""
    adapter = decoder.runner.adapter
    weights = routing.mean_gate()
    available = [e for e in range(layer.num_experts) if routing.count[e] > 0]
    _check_enough(len(available), count)
    refs = {layer.index: layer}
    chosen: list[int] = []
    steps: list[float] = []
    for _ in range(count):
        best, best_value = -1, float("inf")
        for candidate in available:
            if candidate in chosen:
                continue
            experts = chosen + [candidate]
            mlp = condense_layer(adapter, layer, experts, [float(weights[e]) for e in experts], compute_dtype(dtype))
            with swapped_experts(refs, {layer.index: CondensedExperts.from_weights(mlp, dtype=dtype)}):
                out = decoder.run(layer.index, layer.index + 1, inputs)
            value = divergence(reference, out)
            if value < best_value:
                best, best_value = candidate, value
        chosen.append(best)
        steps.append(best_value)
    return chosen, steps


# ---------------------------------------------------------------------------------------------
# the search


@dataclass
class SearchCost:
    """What a search cost: wall time per phase and decoder-layer passes over the calibration set."""

    seconds: dict[str, float] = field(default_factory=dict)
    layer_passes: int = 0
    num_layers: int = 0
    tokens: int = 0
    expert_evaluations: int = 0  # expert forward passes over all calibration tokens (recon statistics)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record; `forward_equivalents` = layer passes / decoder layers."""
        return {"seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "total_seconds": round(sum(self.seconds.values()), 3),
                "decoder_layer_passes": self.layer_passes,
                "forward_equivalents": round(self.layer_passes / max(self.num_layers, 1), 2),
                "expert_evaluations": self.expert_evaluations,
                "tokens": self.tokens}


def resolve_layers(adapter: MoEAdapter, model: nn.Module, layers: Sequence[int] | None, num_layers: int | None
                   ) -> tuple[list[int], int]:
    """(layers searched for experts, how many to condense) with clear errors for bad choices."""
    moe = [ref.index for ref in adapter.moe_layers(model)]
    if layers is not None:
        layers = sorted(set(int(i) for i in layers))
        bad = [i for i in layers if i not in moe]
        if bad:
            raise MoecompressError(f"layer(s) {', '.join(map(str, bad))} are not MoE layers; MoE layers: "
                                   f"{', '.join(map(str, moe))}")
        if not layers:
            raise MoecompressError("--layers lists no layer")
        return layers, len(layers)
    wanted = num_layers if num_layers is not None else max(1, len(moe) // 2)
    if not 1 <= wanted <= len(moe):
        raise MoecompressError(f"--num-layers must be between 1 and the {len(moe)} MoE layers; got {wanted}")
    return moe, wanted


def search_condensation(
    model: nn.Module,
    adapter: MoEAdapter,
    batches: Sequence[tuple[str, torch.Tensor]],
    experts_per_layer: int,
    layers: Sequence[int] | None = None,
    num_layers: int | None = None,
    criterion: str = "recon",
    progress: bool = True,
) -> CondensePlan:
    """Choose experts per layer and (unless `layers` is given) which layers to condense.

    batches: (domain, (B, S) token ids) calibration batches. layers: condense exactly these
    decoder layers (their experts are still searched); None: choose `num_layers` layers
    greedily (default: half of the MoE layers). The model is left unchanged.
    """
    if criterion not in CRITERIA:
        raise MoecompressError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if experts_per_layer < 1:
        raise MoecompressError("--experts must be at least 1")
    refs = moe_layer_map(adapter, model)
    first = next(iter(refs.values()))
    if experts_per_layer > first.num_experts:
        raise MoecompressError(f"--experts {experts_per_layer} is more than the {first.num_experts} routed experts")
    searched, wanted = resolve_layers(adapter, model, layers, num_layers)
    for index in searched:
        check_condensable(adapter, refs[index])
    divergence = DIVERGENCES[criterion]
    dtype = next(model.parameters()).dtype
    cost = SearchCost()

    clock = time.perf_counter()
    decoder = CachedDecoder(model, adapter, batches)
    cost.num_layers = decoder.num_layers
    start = decoder.inputs()
    cost.tokens = sum(int(ids.numel()) for _, ids in batches)
    cost.seconds["prepare"] = time.perf_counter() - clock

    # pass 1: the original model, layer by layer; each searched layer's routing and experts
    clock = time.perf_counter()
    routing: dict[int, LayerRouting] = {}
    experts: dict[int, list[int]] = {}
    expert_search: dict[int, list[float]] = {}
    layer_inputs: dict[int, Hidden] = {}
    hidden = start
    for index in tqdm(range(decoder.num_layers), desc="condense: experts", unit="layer", disable=not progress):
        if index not in searched:
            hidden = decoder.run(index, index + 1, hidden)
            continue
        ref = refs[index]
        tap = ExpertsTap(adapter, ref, gram=(criterion == "recon"))
        handle = ref.experts.register_forward_hook(tap, with_kwargs=True)
        try:
            out = decoder.run(index, index + 1, hidden)
        finally:
            handle.remove()
        routing[index] = tap.routing
        if criterion == "recon":
            cost.expert_evaluations += ref.num_experts
            experts[index], expert_search[index] = greedy_by_reconstruction(tap.routing, experts_per_layer)
        else:
            experts[index], expert_search[index] = greedy_by_divergence(
                decoder, ref, hidden, out, tap.routing, experts_per_layer, divergence, dtype)
        if layers is None:  # the layer search restarts from these cached inputs
            layer_inputs[index] = hidden
        hidden = out
    reference_final = hidden
    cost.seconds["experts"] = time.perf_counter() - clock

    weights = {i: [float(routing[i].mean_gate()[e]) for e in experts[i]] for i in searched}
    layer_search: list[float] = []
    if layers is not None:
        chosen = list(searched)
    else:
        clock = time.perf_counter()
        modules = {}
        for i in searched:
            mlp = condense_layer(adapter, refs[i], experts[i], weights[i], compute_dtype(dtype))
            modules[i] = CondensedExperts.from_weights(mlp, dtype=dtype)
        chosen, layer_search = greedy_layers(decoder, refs, modules, layer_inputs, reference_final, wanted,
                                             divergence, progress)
        cost.seconds["layers"] = time.perf_counter() - clock
    cost.layer_passes = decoder.layer_passes
    return CondensePlan(
        criterion=criterion,
        layer_selection="explicit" if layers is not None else "auto",
        experts_per_layer=experts_per_layer,
        num_experts=first.num_experts,
        top_k=first.top_k,
        layers=chosen,
        experts={i: experts[i] for i in chosen},
        weights={i: weights[i] for i in chosen},
        expert_search=expert_search,
        searched_experts=experts,
        searched_weights=weights,
        layer_search=layer_search,
        tokens=cost.tokens,
        cost=cost.to_dict(),
    )


def greedy_layers(decoder: CachedDecoder, refs: dict[int, MoELayerRef], modules: dict[int, nn.Module],
                  reference_inputs: dict[int, Hidden], reference_final: Hidden, count: int, divergence: Divergence,
                  progress: bool = True) -> tuple[list[int], list[float]]:
    """Layers added one at a time by smallest divergence of the last decoder layer's output.

    A candidate c is evaluated from the cached input of layer c with the chosen layers (and c)
    condensed. Inputs of layers before the first chosen layer are the original model's; the
    others come from one pass per step starting at the first chosen layer.
    """
    last = decoder.num_layers
    chosen: list[int] = []
    steps: list[float] = []
    bar = tqdm(total=count, desc="condense: layers", unit="layer", disable=not progress)
    for _ in range(count):
        remaining = [c for c in sorted(modules) if c not in chosen]
        inputs = {c: reference_inputs[c] for c in remaining}
        if chosen:
            first = min(chosen)
            later = [c for c in remaining if c > first]
            if later:
                hidden = reference_inputs[first]
                with swapped_experts(refs, {i: modules[i] for i in chosen}):
                    for index in range(first, max(later)):
                        hidden = decoder.run(index, index + 1, hidden)
                        if index + 1 in later:
                            inputs[index + 1] = hidden
        best, best_value = -1, float("inf")
        for candidate in remaining:
            with swapped_experts(refs, {i: modules[i] for i in chosen + [candidate]}):
                final = decoder.run(candidate, last, inputs[candidate])
            value = divergence(reference_final, final)
            if value < best_value:
                best, best_value = candidate, value
        chosen.append(best)
        steps.append(best_value)
        bar.update(1)
    bar.close()
    return chosen, steps
