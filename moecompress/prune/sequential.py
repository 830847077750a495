"""Sequential scoring: score and prune MoE layer L on the outputs of the already-pruned layers 0..L-1.

One-pass scoring (``--scoring one-pass``) observes every layer of the unpruned model and then
scores: layer L's statistics are those of inputs h_L = f_{L-1} o ... o f_0 (x). Sequential
scoring, the order llm-compressor's REAP modifier (arXiv 2510.13999's setting) and GPTQ-style
layer-wise compression use, scores layer L on

    h_L = f~_{L-1} o ... o f~_0 (x),   f~_l = layer l routed only to its kept experts K_l,
    K_L = top_{count} S(stats of layer L on h_L)   (per group for group-limited routers),

so each layer's choice accounts for what the pruned layers before it changed. It is one
calibration pass in which every MoE layer runs twice (observed, then routed to K_L to produce
h_{L+1}; `moecompress.calibration.calibrate`), with the same memory as one-pass.

Super experts (`moecompress.prune.super_experts`) are a property of the unpruned model whose
threshold is taken over all layers, so with protection on they are found first, by a one-pass
observation of max_act (or from --stats), and protected in every layer's choice.

Scope: statistics-only expert scorers with uniform allocation (a count per layer is what a
layer can be pruned to before the later layers are seen). Neuron scorers, model-based scorers
(NAEE, PreMoe's TCESS search), global allocation, --dynamic-skip and --patterns score after the
pass and refuse this mode with a one-line error.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel

from moecompress.calibration.stats import RoutingStats
from moecompress.errors import MoecompressError
from moecompress.prune.scorers import Scorer
from moecompress.prune.select import RoutingShape, select_uniform

SCORING_MODES = ("one-pass", "sequential")
DEFAULT_SCORING = "one-pass"


def check_scoring(scoring: str, scorer: Scorer, parsed: BaseModel, allocation: str, adapter: Any | None,
                  dynamic_skip: bool = False, patterns: Any = None) -> None:
    """Refuse, in one line each, the requests `scoring` cannot serve (no model work needed; adapter None: not known yet)."""
    if scoring not in SCORING_MODES:
        raise MoecompressError(f"--scoring must be one of {', '.join(SCORING_MODES)} (got {scoring!r})")
    if scoring == "one-pass":
        return
    name = scorer.name
    if scorer.granularity != "expert":
        raise MoecompressError(f"--scoring sequential removes whole experts; {name} prunes neurons: use --scoring "
                               "one-pass")
    if scorer.uses_model(parsed):
        raise MoecompressError(f"{name} with these parameters scores with the whole model after calibration; use "
                               "--scoring one-pass")
    if allocation != "uniform":
        raise MoecompressError("--scoring sequential prunes each layer before the next is observed, so it keeps the "
                               "same count in every layer: use --allocation uniform")
    if dynamic_skip:
        raise MoecompressError("--dynamic-skip measures its thresholds on the whole model; use --scoring one-pass")
    if patterns is not None:
        raise MoecompressError("--patterns scores every calibration domain after the pass; use --scoring one-pass")
    if adapter is not None and not adapter.layerwise_supported:
        raise MoecompressError("this architecture passes state between decoder layers and cannot run one layer at a "
                               "time, which --scoring sequential needs; use --scoring one-pass")


class SequentialChoice:
    """The `choose_experts` callback of a sequential calibration pass: K_L from layer L's statistics.

    Records what it chose (`kept`) so the caller can check the plan it builds afterwards from
    the pass's statistics chooses the same.
    """

    def __init__(self, scorer: Scorer, params: BaseModel, shape: RoutingShape, count: int, domain: str | None,
                 protected: dict[int, list[int]]) -> None:
        """count: experts kept per layer; protected: super experts per layer, always kept."""
        self.scorer = scorer
        self.params = params
        self.shape = shape
        self.count = count
        self.domain = domain
        self.protected = protected
        self.kept: dict[int, list[int]] = {}

    def __call__(self, index: int, stats: RoutingStats) -> list[int]:
        """The experts MoE layer `index` keeps, scored on its statistics alone."""
        scores: torch.Tensor = self.scorer.score(stats, self.params, self.domain, None)[index]  # (E,)
        kept = select_uniform({index: scores}, self.shape, self.count, {index: self.protected.get(index, [])})[index]
        self.kept[index] = kept
        return kept


def check_same_choice(chosen: dict[int, list[int]], planned: dict[int, list[int]]) -> None:
    """The plan built after the pass keeps what the pass kept in every layer it chose (else a bug: raise)."""
    for index, kept in chosen.items():
        if planned.get(index) != kept:
            raise RuntimeError(f"layer {index}: the pass kept experts {kept} but the plan keeps {planned.get(index)}; "
                               "the scorer does not score each layer from its own statistics")
