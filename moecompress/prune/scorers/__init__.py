"""Registry of pruning scorers: statistics (and, for some, the model) -> scores (higher = keep).

Each scorer lives in its own module in this package, declares the observer statistics it
needs (so calibration collects exactly those) and a pydantic model of its parameters, and
registers itself with `@register_scorer`. Modules are discovered on first use.

One signature for every scorer: `fn(stats, params, domain, context) -> {layer: scores}` with
scores (E,) per MoE layer for expert scorers and (E, I) for neuron scorers (granularity
"neuron"). Most scorers read statistics only and ignore `context`. Model-based scorers
(NAEE's reconstruction search, PreMoe's TCESS with a threshold or top-k > 1) declare
`needs_model` and receive a `ScoringContext`: the loaded model, its adapter, the calibration
batches and the selection constraints. `needs` and `needs_model` may depend on the parameters
(a callable of the parsed params).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from moecompress.errors import MoecompressError


class NoParams(BaseModel):
    """A scorer without parameters."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ScoringContext:
    """What model-based scorers get besides statistics.

    batches: calibration (domain, (B, S) token ids) batches; keep: experts kept per layer
    (uniform allocation); protected: super experts per layer that must stay.
    """

    model: Any
    adapter: Any
    batches: list[tuple[str, torch.Tensor]]
    shape: Any = None  # prune.select.RoutingShape
    keep: int | None = None
    protected: dict[int, list[int]] = field(default_factory=dict)
    seed: int = 0
    progress: bool = True

    def batches_for(self, domain: str | None) -> list[tuple[str, torch.Tensor]]:
        """The calibration batches of one domain (all batches for None)."""
        chosen = [b for b in self.batches if domain is None or b[0] == domain]
        if not chosen:
            raise MoecompressError(f"no calibration batches for domain {domain!r}")
        return chosen


# score(stats, params, domain, context) -> {layer: (E,) or (E, I) scores}
ScoreFn = Callable[[Any, BaseModel, "str | None", "ScoringContext | None"], dict[int, torch.Tensor]]
Needs = tuple[str, ...] | Callable[[BaseModel], tuple[str, ...]]
NeedsModel = bool | Callable[[BaseModel], bool]


@dataclass(frozen=True)
class Scorer:
    """A registered pruning criterion."""

    name: str
    needs: Needs
    params: type[BaseModel]
    fn: ScoreFn
    summary: str
    granularity: str = "expert"
    needs_model: NeedsModel = False

    def statistics(self, params: BaseModel | dict | None = None) -> tuple[str, ...]:
        """Observer statistics this scorer reads with these parameters."""
        if callable(self.needs):
            return tuple(self.needs(self._parsed(params)))
        return tuple(self.needs)

    def uses_model(self, params: BaseModel | dict | None = None) -> bool:
        """True when scoring with these parameters needs the model and calibration batches."""
        if callable(self.needs_model):
            return bool(self.needs_model(self._parsed(params)))
        return bool(self.needs_model)

    def _parsed(self, params: BaseModel | dict | None) -> BaseModel:
        return params if isinstance(params, BaseModel) else self.parse_params(params)

    def parse_params(self, values: dict[str, Any] | None) -> BaseModel:
        """Validate user parameters against the scorer's model; one-line error on failure."""
        try:
            return self.params.model_validate(values or {})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "params"
            raise MoecompressError(f"method {self.name!r}: {where}: {first['msg']}") from None

    def score(self, stats: Any, params: BaseModel | dict | None = None, domain: str | None = None,
              context: ScoringContext | None = None) -> dict[int, torch.Tensor]:
        """Scores per MoE layer, float64, shape (E,) (or (E, I) for neuron scorers)."""
        params = self._parsed(params)
        missing = [name for name in self.statistics(params) if not stats.has(name)]
        if missing:
            raise MoecompressError(
                f"method {self.name!r} needs statistic(s) {', '.join(missing)} that these stats lack; "
                "re-run calibrate with them"
            )
        if self.uses_model(params) and context is None:
            raise MoecompressError(f"method {self.name!r} with these parameters needs the model and calibration data, "
                                   "not only statistics")
        return self.fn(stats, params, domain, context)


_SCORERS: dict[str, Scorer] = {}
_LOADED = False


def register_scorer(name: str, needs: Needs, params: type[BaseModel] = NoParams, summary: str = "",
                    granularity: str = "expert", needs_model: NeedsModel = False) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering `fn(stats, params, domain, context) -> {layer: scores}` under `name`.

    needs: observer statistics read (or a function of the parsed params returning them);
    granularity: "expert" ((E,) scores) or "neuron" ((E, I) scores);
    needs_model: True (or a function of the params) when the scorer runs the model itself.
    """
    if granularity not in ("expert", "neuron"):
        raise ValueError(f"granularity must be 'expert' or 'neuron', got {granularity!r}")

    def wrap(fn: ScoreFn) -> ScoreFn:
        if name in _SCORERS:
            raise RuntimeError(f"scorer {name!r} registered twice")
        _SCORERS[name] = Scorer(name=name, needs=needs if callable(needs) else tuple(needs), params=params, fn=fn,
                                summary=summary or (fn.__doc__ or "").strip().splitlines()[0], granularity=granularity,
                                needs_model=needs_model)
        return fn

    return wrap


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True


def get_scorer(name: str) -> Scorer:
    """The scorer registered as `name`; a clear error listing the known ones otherwise."""
    _load_all()
    if name not in _SCORERS:
        raise MoecompressError(f"unknown pruning method {name!r}; available: {', '.join(sorted(_SCORERS))}")
    return _SCORERS[name]


def available_scorers() -> dict[str, Scorer]:
    """Every registered scorer by name."""
    _load_all()
    return dict(sorted(_SCORERS.items()))


def per_layer(stats: Any, statistic: str, domain: str | None) -> dict[int, torch.Tensor]:
    """One statistic for every MoE layer: {layer: tensor}."""
    return {layer: stats.get(statistic, layer, domain) for layer in stats.header.moe_layers}


def safe_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count with 0 where count is 0 (experts never routed score lowest)."""
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
