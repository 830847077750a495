"""PreMoe TAER: task-adaptive expert retrieval (arXiv 2505.17639).

For every calibration domain (task) PreMoe stores a compact expert pattern: the experts kept
per MoE layer by TCESS on that task's tokens, and the FIRST MoE layer's TCESS vector (E,).
For a new query it computes the query's first-layer TCESS, picks the stored task with the
nearest vector (L2) and builds the pruned model for that task.

A patterns file is JSON (`ExpertPatterns`): the source checkpoint and its config hash, the
TCESS options, the kept count, and one `DomainPattern` per domain. `prune --method premoe
--patterns P` writes it; `route-task PROMPTS --patterns P -o OUT` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from moecompress.calibration.stats import RoutingStats
from moecompress.io.provenance import config_hash
from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter
from moecompress.prune.request import PruneRequest
from moecompress.prune.scorers import ScoringContext, get_scorer

PATTERNS_FORMAT = "moecompress-premoe-patterns"
PATTERNS_VERSION = 1


class DomainPattern(BaseModel):
    """One task's pattern: kept experts per MoE layer and the first MoE layer's TCESS vector."""

    model_config = ConfigDict(extra="forbid")

    keep: dict[int, list[int]]
    tcess_first: list[float]


class ExpertPatterns(BaseModel):
    """Every calibration domain's pattern for one checkpoint."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["moecompress-premoe-patterns"] = PATTERNS_FORMAT
    version: int = PATTERNS_VERSION
    source: str
    model_type: str
    config_hash: str
    params: dict[str, Any]  # PreMoe TCESS options (top_k, threshold)
    first_layer: int
    num_experts: int
    top_k: int
    kept_per_layer: int
    protected: dict[int, list[int]] = {}
    stats_digest: str
    patterns: dict[str, DomainPattern]


def build_patterns(stats: RoutingStats, adapter: MoEAdapter, config: Any, source: str | Path, request: PruneRequest,
                   context: ScoringContext | None = None) -> ExpertPatterns:
    """One PreMoe pattern per calibration domain (uniform allocation, same kept count everywhere), with the
    request's ratio or keep, parameters and super-expert protection."""
    from moecompress.prune.run import plan_pruning

    scorer = get_scorer("premoe")
    parsed = scorer.parse_params(request.params)
    first = min(stats.header.moe_layers)
    found: dict[str, DomainPattern] = {}
    plan = None
    for domain in stats.header.domains:
        scores = scorer.score(stats, parsed, domain, context)
        plan = plan_pruning(stats, adapter, config, request.model_copy(update={
            "method": "premoe", "domain": domain, "allocation": "uniform"}), scores=scores)
        found[domain] = DomainPattern(keep=plan.keep, tcess_first=[float(v) for v in scores[first]])
    assert plan is not None
    return ExpertPatterns(source=str(source), model_type=config.model_type, config_hash=config_hash(config),
                          params=parsed.model_dump(), first_layer=first, num_experts=plan.num_experts, top_k=plan.top_k,
                          kept_per_layer=len(next(iter(plan.keep.values()))), protected=plan.protected,
                          stats_digest=stats.digest(), patterns=found)


def save_patterns(patterns: ExpertPatterns, path: str | Path) -> Path:
    """Write the patterns JSON atomically (temporary file renamed into place)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(patterns.model_dump_json(indent=2) + "\n")
    tmp.replace(out)
    return out


def load_patterns(path: str | Path) -> ExpertPatterns:
    """Read a patterns file with one-line errors."""
    src = Path(path)
    if not src.is_file():
        raise MoecompressError(f"patterns file {str(src)!r} does not exist; create it with "
                               "`moecompress prune --method premoe --patterns FILE`")
    try:
        patterns = ExpertPatterns.model_validate_json(src.read_text())
    except (ValidationError, json.JSONDecodeError, UnicodeDecodeError) as err:
        detail = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
        raise MoecompressError(f"{src} is not a moecompress patterns file: {detail}") from None
    if patterns.version != PATTERNS_VERSION:
        raise MoecompressError(f"{src} has patterns version {patterns.version}; this moecompress reads {PATTERNS_VERSION}")
    return patterns


def nearest_pattern(patterns: ExpertPatterns, tcess_first: torch.Tensor) -> tuple[str, dict[str, float]]:
    """The domain whose stored first-layer TCESS is nearest (L2) to `tcess_first` (E,), and every distance."""
    distances = {}
    for name, pattern in patterns.patterns.items():
        stored = torch.tensor(pattern.tcess_first, dtype=torch.float64)
        if stored.shape != tcess_first.shape:
            raise MoecompressError(f"pattern {name!r} has {stored.numel()} experts, the query {tcess_first.numel()}")
        distances[name] = float(torch.linalg.vector_norm(stored - tcess_first.double()))
    best = min(sorted(distances), key=lambda n: distances[n])
    return best, distances
