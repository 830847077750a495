"""What a prune is asked to do: one model of every option `prune_checkpoint` and `plan_pruning` read.

`moecompress prune` builds it from its flags (`cli/prune_cmd.py`), the recipe's prune step from
its keys (`recipe/execute.py`), and the benchmarks and tests directly. How a run behaves
(dry run, overwriting, progress, resuming) and the statistics it reuses are not part of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from moecompress.calibration.request import CalibrationRequest, plain_values
from moecompress.prune.merge import DEFAULT_MERGE
from moecompress.prune.scorer_names import DEFAULT_PRUNE_METHOD
from moecompress.prune.sequential import DEFAULT_SCORING


class PruneRequest(BaseModel):
    """The options of one prune: method and budget, selection rules, calibration data and compute."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    # method and budget
    method: str = DEFAULT_PRUNE_METHOD
    ratio: float | None = None  # fraction of routed experts (or neurons) removed
    keep: int | None = None  # experts kept per MoE layer (instead of ratio)
    params: dict[str, Any] | None = None  # the method's parameters
    # selection
    domain: str | None = None  # score on this calibration domain only
    protect_super_experts: bool = True
    allocation: str | None = None  # uniform | global; None: the method's default
    new_top_k: int | None = None  # the pruned router's top-k (None: the checkpoint's)
    dynamic_skip: bool = False  # NAEE's dynamic expert skipping
    patterns: Path | None = None  # PreMoe: also write one expert pattern per domain here
    scoring: str = DEFAULT_SCORING  # one-pass | sequential
    merge: str = DEFAULT_MERGE  # none | centroid | cluster
    # calibration data
    sources: list[Any] | None = None  # DomainSource list; None: the shipped calibration sets
    samples: int = 32  # windows per domain
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    # compute
    dtype: str = "auto"
    device: str = "cpu"
    max_memory: str | int | None = None

    def calibration(self, statistics: Sequence[str]) -> CalibrationRequest:
        """The calibration pass this prune runs, observing `statistics` (layer by layer)."""
        return CalibrationRequest(sources=self.sources, samples=self.samples, seq_len=self.seq_len, seed=self.seed,
                                  batch_size=self.batch_size, dtype=self.dtype, statistics=list(statistics),
                                  device=self.device, max_memory=self.max_memory)

    def fingerprint(self) -> dict[str, Any]:
        """The options as plain values, for a resumed run to check it is the same run."""
        return plain_values(self, listed=("sources",), as_text=("patterns",))
