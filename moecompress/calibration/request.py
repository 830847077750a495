"""What a calibration pass is asked to do: the data it reads and how it computes.

`calibrate` and `calibrate_to_folder` take one `CalibrationRequest`; `moecompress calibrate`
builds it from its flags, the recipe's calibrate step from its keys, and prune, compress and
the benchmarks from their own options. `ObservedPass` holds how one observed pass over
already-tokenised windows runs (`collect_statistics`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from moecompress.calibration.observer import DEFAULT_STATISTICS
from moecompress.calibration.stats import RoutingStats
from moecompress.engine.reader import CheckpointReader
from moecompress.engine.resume import LayerPassCheckpoints

# (MoE layer index, that layer's statistics as observed) -> the experts the layer keeps
ExpertChoice = Callable[[int, RoutingStats], Sequence[int]]


class CalibrationRequest(BaseModel):
    """The calibration data (windows per domain, seeded), the statistics observed, and the compute options."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    sources: list[Any] | None = None  # DomainSource list; None: the shipped calibration sets
    samples: int = 32  # windows of seq_len tokens per domain
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    dtype: str = "auto"  # compute dtype; auto: the checkpoint's
    statistics: list[str] = Field(default_factory=lambda: list(DEFAULT_STATISTICS))
    mode: str = "layerwise"  # layerwise (one decoder layer in memory) | whole-model
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    max_memory: str | int | None = None  # host bytes the pass may plan with (default: a share of what is free)

    def fingerprint(self) -> dict[str, Any]:
        """The request as plain values, for a resumed run to check it is the same run."""
        return plain_values(self, listed=("sources",))


def plain_values(request: BaseModel, listed: Sequence[str] = (), as_text: Sequence[str] = ()) -> dict[str, Any]:
    """A request's fields as JSON-ready values (a resumed run compares them with the stored run's).

    listed: fields holding lists of objects (data sources), kept as their reprs; as_text:
    fields holding one object (a path, a pattern set), kept as its text or None.
    """
    data = request.model_dump(exclude=set(listed) | set(as_text))
    for name in listed:
        data[name] = [repr(item) for item in getattr(request, name) or []]
    for name in as_text:
        value = getattr(request, name)
        data[name] = None if value is None else str(value)
    return data


@dataclass
class ObservedPass:
    """How `collect_statistics` runs one observed pass (see its docstring for each field)."""

    statistics: Sequence[str] = DEFAULT_STATISTICS
    batch_size: int = 8
    mode: str = "layerwise"
    reader: CheckpointReader | None = None
    device: torch.device | str | None = None
    max_layer_bytes: int | None = None
    data_parallel: bool = False
    checkpoints: LayerPassCheckpoints | None = None
    spill_to: Path | None = None
    choose_experts: ExpertChoice | None = None
