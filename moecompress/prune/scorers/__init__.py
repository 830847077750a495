"""Registry of pruning scorers: statistics -> one score per expert (higher = keep).

Each scorer lives in its own module in this package, declares the observer statistics it
needs (so calibration collects exactly those) and a pydantic model of its parameters, and
registers itself with `@register_scorer`. Modules are discovered on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from moecompress.errors import MoecompressError


class NoParams(BaseModel):
    """A scorer without parameters."""

    model_config = ConfigDict(extra="forbid")


# score(stats, params, domain) -> {layer: (E,) scores}
ScoreFn = Callable[[Any, BaseModel, "str | None"], dict[int, torch.Tensor]]


@dataclass(frozen=True)
class Scorer:
    """A registered pruning criterion."""

    name: str
    needs: tuple[str, ...]
    params: type[BaseModel]
    fn: ScoreFn
    summary: str
    granularity: str = "expert"

    def parse_params(self, values: dict[str, Any] | None) -> BaseModel:
        """Validate user parameters against the scorer's model; one-line error on failure."""
        try:
            return self.params.model_validate(values or {})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "params"
            raise MoecompressError(f"method {self.name!r}: {where}: {first['msg']}") from None

    def score(self, stats: Any, params: BaseModel | dict | None = None, domain: str | None = None) -> dict[int, torch.Tensor]:
        """Scores per MoE layer, float64, shape (E,) (or (E, I) for neuron scorers)."""
        missing = [name for name in self.needs if not stats.has(name)]
        if missing:
            raise MoecompressError(
                f"method {self.name!r} needs statistic(s) {', '.join(missing)} that these stats lack; "
                "re-run calibrate with them"
            )
        if not isinstance(params, BaseModel):
            params = self.parse_params(params)
        return self.fn(stats, params, domain)


_SCORERS: dict[str, Scorer] = {}
_LOADED = False


def register_scorer(name: str, needs: tuple[str, ...], params: type[BaseModel] = NoParams,
                    summary: str = "", granularity: str = "expert") -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering `fn(stats, params, domain) -> {layer: scores}` under `name`."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        if name in _SCORERS:
            raise RuntimeError(f"scorer {name!r} registered twice")
        _SCORERS[name] = Scorer(name=name, needs=tuple(needs), params=params, fn=fn,
                                summary=summary or (fn.__doc__ or "").strip().splitlines()[0], granularity=granularity)
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
