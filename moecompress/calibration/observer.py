"""One-pass routing observer: every statistic the methods read (docs/concepts.md), from one forward pass.

Per MoE layer l, expert j, domain d, over the tokens routed to j only (X_j), in float64:

    count           N_j = sum_t 1[j in K_t]
    soft_count      sum_t g_{j,t}                      (g = the coefficient the model really applies)
    out_norm        sum_{t in X_j} ||f_j(x_t)||
    out_norm_sq     sum_{t in X_j} ||f_j(x_t)||^2
    gated_out_norm  sum_{t in X_j} g_{j,t} ||f_j(x_t)||                        (REAP, arXiv 2510.13999)
    easy_ep         sum_{t in X_j} g_{j,t} ||f_j(x_t)|| s_t,
                    s_t = max(0, 1 - cos(h_t, h_t + y_t))                       (EASY-EP, arXiv 2504.06792)
    top1_logit      sum_t 1[j = argmax_i l_{t,i}] l_{t,j}   (divide by tokens)  (PreMoe TCESS, arXiv 2505.17639)
    max_act         max_{t in X_j} max |f_j(x_t)|                               (super experts, arXiv 2507.23279)
    neuron_act_sq   sum_{t in X_j} a_{t,k}^2, a = down_proj input  (E, I)       (HEAPr, arXiv 2509.22299)
    neuron_grad_proj sum_{t in X_j} (g'_t . w_k)^2  (E, I), g'_t = dLoss/df_j(x_t), w_k = column k of W_down;
                    the O(E x I) identity for w_k^T M_e w_k, never a d x d matrix (opt-in: needs backward)
    mean_output     sum_t f_j(x_t) over EVERY token t of the layer, routed or not  (E, H)
                    (HC-SMoE expert merging, arXiv 2410.08589; divide by tokens; opt-in: every expert
                    runs on every token, E/k times the routed experts' compute)

h_t is the residual stream entering the MoE block and y_t the routed experts' combined output
(shared experts excluded). g, the chosen experts and the logits come from the model's own
router; expert outputs are computed once, for routed tokens only, by the adapter's
`run_experts` (the same arithmetic as the model), so the pass costs one forward plus
bookkeeping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef

EXPERT_STATISTICS = ("count", "soft_count", "out_norm", "out_norm_sq", "gated_out_norm", "easy_ep", "top1_logit", "max_act")
NEURON_STATISTICS = ("neuron_act_sq",)
GRADIENT_STATISTICS = ("neuron_grad_proj",)
DENSE_STATISTICS = ("mean_output",)
DEFAULT_STATISTICS = EXPERT_STATISTICS + NEURON_STATISTICS
ALL_STATISTICS = DEFAULT_STATISTICS + GRADIENT_STATISTICS + DENSE_STATISTICS
# tokens x experts x hidden float32 values one dense chunk of `mean_output` may hold (256 MiB)
DENSE_CHUNK_VALUES = 64 * 2**20


def validate_statistics(names: Sequence[str]) -> list[str]:
    """Known statistic names, in canonical order; unknown ones raise a one-line error."""
    unknown = sorted(set(names) - set(ALL_STATISTICS))
    if unknown:
        raise MoecompressError(f"unknown statistic(s) {', '.join(unknown)}; known: {', '.join(ALL_STATISTICS)}")
    return [name for name in ALL_STATISTICS if name in set(names)]


class LayerObserver:
    """Accumulates the statistics of one MoE layer; called by `run_experts` once per expert."""

    def __init__(self, adapter: MoEAdapter, layer: MoELayerRef, statistics: Sequence[str], domains: Sequence[str],
                 device: torch.device | str = "cpu") -> None:
        self.adapter = adapter
        self.layer = layer
        self.statistics = set(statistics)
        num_experts = layer.num_experts
        first = adapter.expert_weights(layer, 0)
        width = first.intermediate_size
        self.intermediate_size = width
        hidden_size = first.down.shape[0]
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        for domain in domains:
            per = {}
            for name in statistics:
                shape = (num_experts, width) if name in NEURON_STATISTICS + GRADIENT_STATISTICS else (num_experts,)
                if name in DENSE_STATISTICS:
                    shape = (num_experts, hidden_size)
                per[name] = torch.zeros(shape, dtype=torch.float64, device=device)
            self.sums[domain] = per
        self.tokens: dict[str, int] = {domain: 0 for domain in domains}
        self.domain = domains[0]
        self.residual: torch.Tensor | None = None  # (T, H) set by the residual hook
        self._pending_easy: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    # called by run_experts
    def __call__(self, expert: int, token_idx: torch.Tensor, slot: torch.Tensor, x: torch.Tensor,
                 act: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> None:
        acc = self.sums[self.domain]
        stats = self.statistics
        if "neuron_grad_proj" in stats and out.requires_grad:
            self._hook_gradient(expert, out)
        with torch.no_grad():
            out_d = out.detach().double()
            gate_d = gate.detach().double()
            norms = out_d.norm(dim=-1)  # (N_e,)
            if "count" in stats:
                acc["count"][expert] += token_idx.numel()
            if "soft_count" in stats:
                acc["soft_count"][expert] += gate_d.sum()
            if "out_norm" in stats:
                acc["out_norm"][expert] += norms.sum()
            if "out_norm_sq" in stats:
                acc["out_norm_sq"][expert] += norms.square().sum()
            gated = gate_d * norms  # (N_e,)
            if "gated_out_norm" in stats:
                acc["gated_out_norm"][expert] += gated.sum()
            if "easy_ep" in stats:
                self._pending_easy.append((expert, token_idx, gated))
            if "max_act" in stats:
                acc["max_act"][expert] = torch.maximum(acc["max_act"][expert], out_d.abs().max())
            if "neuron_act_sq" in stats:
                acc["neuron_act_sq"][expert] += act.detach().double().square().sum(dim=0)

    def _hook_gradient(self, expert: int, out: torch.Tensor) -> None:
        target = self.sums[self.domain]["neuron_grad_proj"]

        def on_grad(grad: torch.Tensor) -> None:
            # W_down is read when the gradient arrives: a float64 copy taken at forward time would be
            # held for every expert until the backward, O(E x H x I) per layer instead of O(E x I)
            down = self.adapter.expert_weights(self.layer, expert).down.detach().double()  # (H, I)
            projected = grad.detach().double() @ down  # (N_e, I) = g'_t . w_k
            target[expert] += projected.square().sum(dim=0)

        out.register_hook(on_grad)

    def finish(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, combined: torch.Tensor) -> None:
        """After all experts of one call: EASY-EP's s_t needs the combined routed output y_t; dense statistics."""
        if "mean_output" in self.statistics:
            self._observe_dense(hidden)
        if not self._pending_easy:
            return
        with torch.no_grad():
            h = self.residual if self.residual is not None and self.residual.shape[0] == hidden.shape[0] else hidden
            h = h.detach().double()
            y = combined.detach().double()
            shift = (1.0 - nn.functional.cosine_similarity(h, h + y, dim=-1)).clamp(min=0.0)  # (T,)
            acc = self.sums[self.domain]["easy_ep"]
            for expert, token_idx, gated in self._pending_easy:
                acc[expert] += (gated * shift[token_idx]).sum()
        self._pending_easy.clear()
        self.residual = None

    def _observe_dense(self, hidden: torch.Tensor) -> None:
        """mean_output: every expert on every token of hidden (T, H), in chunks of tokens, through `run_experts`."""
        target = self.sums[self.domain]["mean_output"]  # (E, H)
        num_experts = target.shape[0]

        def add(expert: int, token_idx: torch.Tensor, slot: torch.Tensor, x: torch.Tensor, act: torch.Tensor,
                out: torch.Tensor, gate: torch.Tensor) -> None:
            target[expert] += out.detach().double().sum(dim=0)

        with torch.no_grad():
            flat = hidden.detach().reshape(-1, hidden.shape[-1])  # (T, H)
            chunk = max(1, DENSE_CHUNK_VALUES // max(1, num_experts * flat.shape[-1]))
            for start in range(0, flat.shape[0], chunk):
                part = flat[start:start + chunk]  # (t, H)
                every = torch.arange(num_experts, device=part.device).expand(part.shape[0], num_experts)  # (t, E)
                ones = torch.ones(every.shape, dtype=part.dtype, device=part.device)
                self.adapter.run_experts(self.layer, part, every, ones, visit=add)

    def on_router_output(self, logits: torch.Tensor) -> None:
        """Router forward hook: token count and the TCESS top-1 logit sum."""
        logits = logits.detach().reshape(-1, logits.shape[-1])  # (T, E)
        self.tokens[self.domain] += logits.shape[0]
        if "top1_logit" in self.statistics:
            with torch.no_grad():
                top = logits.argmax(dim=-1)  # (T,)
                values = logits.gather(1, top[:, None]).squeeze(1).double()
                self.sums[self.domain]["top1_logit"].index_add_(0, top, values)


class Observer:
    """Collects statistics for the MoE layers of one model while `active()` is entered."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter, domains: Sequence[str],
                 statistics: Sequence[str] = DEFAULT_STATISTICS, layers: Sequence[int] | None = None,
                 device: torch.device | str = "cpu") -> None:
        """Accumulators (float64) live on `device`, where the layers compute."""
        if not domains:
            raise MoecompressError("the observer needs at least one calibration domain")
        self.model = model
        self.adapter = adapter
        self.domains = list(domains)
        self.statistics = validate_statistics(statistics)
        refs = adapter.moe_layers(model)
        if layers is not None:
            refs = [ref for ref in refs if ref.index in set(layers)]
        self.layers = refs
        self.observers = {ref.index: LayerObserver(adapter, ref, self.statistics, self.domains, device) for ref in refs}
        self._reduced: set[int] = set()  # layers `all_reduce` has combined across ranks

    def set_domain(self, domain: str) -> None:
        """Attribute the following forward passes to `domain`."""
        if domain not in self.domains:
            raise MoecompressError(f"unknown domain {domain!r}; observer domains: {', '.join(self.domains)}")
        for obs in self.observers.values():
            obs.domain = domain

    @contextlib.contextmanager
    def active(self, layers: Sequence[int] | None = None) -> Iterator[Observer]:
        """Within the context, forward passes through the chosen layers (default all) are observed."""
        chosen = [ref for ref in self.layers if layers is None or ref.index in set(layers)]
        handles: list[Any] = []
        adapter = self.adapter
        try:
            for ref in chosen:
                obs = self.observers[ref.index]

                def router_hook(module, args, output, _obs=obs):
                    _obs.on_router_output(adapter.router_logits_from_output(output))

                handles.append(ref.router.register_forward_hook(router_hook))
                residual_module = adapter.residual_module(self.model, ref)
                if residual_module is not None and "easy_ep" in self.statistics:

                    def residual_hook(module, args, _obs=obs):
                        hidden = args[0]
                        _obs.residual = hidden.detach().reshape(-1, hidden.shape[-1])

                    handles.append(residual_module.register_forward_pre_hook(residual_hook))
            with adapter.instrument(self.model, {ref.index: self.observers[ref.index] for ref in chosen}):
                yield self
        finally:
            for handle in handles:
                handle.remove()

    def tensors(self, layers: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Every accumulated tensor (of these MoE layers; default all), named as in `RoutingStats.key`."""
        from moecompress.calibration.stats import RoutingStats

        out = {}
        for index, obs in self.observers.items():
            if layers is not None and index not in layers:
                continue
            for domain, per in obs.sums.items():
                for name, tensor in per.items():
                    out[RoutingStats.key(name, index, domain)] = tensor.to("cpu", copy=True)
        return out

    def layer_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """MoE layer `index`'s accumulators, keyed "domain/statistic" (a resumable run's checkpoint)."""
        return {f"{domain}/{name}": tensor for domain, per in self.observers[index].sums.items()
                for name, tensor in per.items()}

    def restore_layers(self, layers: dict[int, dict[str, torch.Tensor]], tokens: dict[str, dict[str, int]]) -> None:
        """Put back what `layer_tensors` and `token_counts` returned for finished layers (a resumed run)."""
        for index, saved in layers.items():
            obs = self.observers[index]
            for key, tensor in saved.items():
                domain, name = key.split("/", 1)
                obs.sums[domain][name].copy_(tensor)
        for index, per in tokens.items():
            if int(index) in self.observers:
                self.observers[int(index)].tokens.update({domain: int(n) for domain, n in per.items()})

    def token_counts(self, layers: Sequence[int] | None = None) -> dict[str, dict[str, int]]:
        """layer -> domain -> tokens seen by the router (these MoE layers; default all)."""
        return {str(index): dict(obs.tokens) for index, obs in self.observers.items()
                if layers is None or index in layers}

    def all_reduce(self, layers: Sequence[int] | None = None) -> None:
        """Combine what every rank observed (data-parallel calibration), in place; a no-op in one process.

        Each rank has observed its own share of the batches; afterwards every rank holds what
        one process observing all of them holds: the sums (float64) and the token counts
        (int64) are added, the statistics combined by max (`MAX_STATISTICS`: max_act) take the
        maximum. Up to the order of float64 additions, the result equals a single process's.
        Collective: every rank calls it, with the same layers, domains and statistics; one
        layer is reduced at a time (two reductions per layer plus one for the token counts).
        layers: reduce only these MoE layers (default all); a layer is reduced once, so a later
        call skips the layers an earlier one reduced (sequential calibration reduces each layer
        as soon as it is observed, then the whole observer after the pass).
        """
        from moecompress.calibration.stats import MAX_STATISTICS
        from moecompress.engine import distributed

        if not distributed.active():
            return
        chosen = sorted(index for index in self.observers if (layers is None or index in set(layers))
                        and index not in self._reduced)
        if not chosen:
            return
        self._reduced.update(chosen)
        for index in chosen:
            obs = self.observers[index]
            if obs._pending_easy:
                raise RuntimeError(f"layer {index} has EASY-EP terms not finished; reduce after the pass")
            for op, names in (("sum", [n for n in self.statistics if n not in MAX_STATISTICS]),
                              ("max", [n for n in self.statistics if n in MAX_STATISTICS])):
                parts = [obs.sums[domain][name] for domain in self.domains for name in names]
                if not parts:
                    continue
                flat = distributed.all_reduce_(torch.cat([part.reshape(-1) for part in parts]), op)
                for part, value in zip(parts, flat.split([part.numel() for part in parts])):
                    part.copy_(value.view_as(part))
        order = [(index, domain) for index in chosen for domain in self.domains]
        tokens = torch.tensor([self.observers[index].tokens[domain] for index, domain in order], dtype=torch.int64)
        distributed.all_reduce_(tokens, "sum")
        for (index, domain), value in zip(order, tokens.tolist()):
            self.observers[index].tokens[domain] = int(value)
