"""Expert pruning end to end: statistics -> scores -> plan -> smaller checkpoint.

`plan_pruning` needs only the config and statistics (fast, used by --dry-run);
`prune_checkpoint` also loads the model, drops the experts (router rows, correction biases and
config patched by the adapter) and writes a checkpoint plain transformers loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecompress.calibration.stats import RoutingStats
from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter
from moecompress.prune.plan import PrunePlan
from moecompress.prune.scorers import get_scorer
from moecompress.prune.select import RoutingShape, kept_count, select_uniform
from moecompress.prune.super_experts import find_super_experts

log = logging.getLogger(__name__)


def routing_shape(adapter: MoEAdapter, config: Any) -> RoutingShape:
    """The router facts selection needs, from the adapter and config."""
    return RoutingShape(
        num_experts=adapter.num_experts(config),
        top_k=adapter.top_k(config),
        groups=adapter.groups(config),
        min_kept_per_group=getattr(adapter, "min_kept_per_group", 1),
    )


def required_statistics(method: str, protect_super_experts: bool) -> list[str]:
    """Statistics calibration must collect for `method` (plus max_act for super-expert protection)."""
    needs = list(get_scorer(method).needs)
    if protect_super_experts and "max_act" not in needs:
        needs.append("max_act")
    if "count" not in needs:
        needs.append("count")
    return needs


def plan_pruning(stats: RoutingStats, adapter: MoEAdapter, config: Any, method: str, ratio: float | None = None,
                 keep: int | None = None, params: dict[str, Any] | None = None, domain: str | None = None,
                 protect_super_experts: bool = True) -> PrunePlan:
    """Score experts with `method` and choose the kept set per layer (uniform allocation)."""
    scorer = get_scorer(method)
    if scorer.granularity != "expert":
        raise MoecompressError(f"method {method!r} prunes neurons, not experts")
    shape = routing_shape(adapter, config)
    count = kept_count(shape, ratio=ratio, keep=keep)
    parsed = scorer.parse_params(params)
    if domain is not None and domain not in stats.header.domains:
        raise MoecompressError(f"--domain {domain!r} is not a calibration domain; have: {', '.join(stats.header.domains)}")
    scores = scorer.score(stats, parsed, domain)
    protected: dict[int, list[int]] = {}
    if protect_super_experts:
        if not stats.has("max_act"):
            raise MoecompressError("super-expert protection needs the max_act statistic; re-run calibrate or pass "
                                   "--no-protect-super-experts")
        num_layers = getattr(config, "num_hidden_layers", max(stats.header.moe_layers) + 1)
        protected = find_super_experts({layer: stats.get("max_act", layer) for layer in stats.header.moe_layers},
                                       num_layers)
    kept = select_uniform(scores, shape, count, protected)
    return PrunePlan(method=method, params=parsed.model_dump(), allocation="uniform", domain=domain,
                     num_experts=shape.num_experts, top_k=shape.top_k, keep=kept, protected=protected,
                     scores={layer: [round(float(v), 8) for v in s] for layer, s in scores.items()})


@dataclass
class PruneResult:
    """What `prune_checkpoint` did."""

    plan: PrunePlan
    output: Path | None
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int


def readme_for(plan: PrunePlan, source: Path) -> str:
    """The short README written into a pruned checkpoint."""
    kept = next(iter(plan.kept_counts().values()))
    return (
        f"# Pruned with moecompress\n\n"
        f"Source: `{source}`. Method: `{plan.method}` ({plan.allocation} allocation), "
        f"{kept} of {plan.num_experts} routed experts kept in every MoE layer"
        f"{f', calibrated on domain `{plan.domain}`' if plan.domain else ''}.\n\n"
        "The config's expert count is patched and router rows (and correction biases) are sliced, so this folder "
        "loads with plain `transformers.AutoModelForCausalLM.from_pretrained` (no remote code).\n\n"
        "`moecompress_manifest.json` records the method, parameters, kept experts per layer, the calibration "
        "statistics digest, the seed and library versions.\n"
    )


def _expert_numel(adapter: MoEAdapter, model: Any) -> int:
    layer = adapter.moe_layers(model)[0]
    expert = adapter.expert_weights(layer, 0)
    parts = [expert.gate, expert.up, expert.down, expert.gate_bias, expert.up_bias, expert.down_bias]
    return sum(p.numel() for p in parts if p is not None)


def _skeleton(config: Any) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def prune_checkpoint(
    checkpoint: str | Path,
    output: str | Path | None,
    method: str,
    ratio: float | None = None,
    keep: int | None = None,
    params: dict[str, Any] | None = None,
    domain: str | None = None,
    stats: RoutingStats | None = None,
    sources: list[Any] | None = None,
    samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    dtype: str = "float32",
    protect_super_experts: bool = True,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Calibrate (or reuse `stats`), score, select and write a pruned checkpoint to `output`.

    Every check that needs no model (method, ratio feasibility, output folder, stats identity)
    runs before any model work. The input checkpoint is never modified; the output folder is
    written to a temporary sibling and renamed into place when complete.
    """
    from moecompress.calibration.calibrate import calibrate
    from moecompress.calibration.stats import config_hash
    from moecompress.io.checkpoint import folder_bytes, write_checkpoint
    from moecompress.io.manifest import build_manifest
    from moecompress.io.output import atomic_output_dir, check_output_dir
    from moecompress.models.load import inspect_checkpoint, load_model, load_tokenizer

    source = Path(checkpoint)
    if not dry_run:
        if output is None:
            raise MoecompressError("pass -o/--output for the pruned checkpoint (or --dry-run)")
        check_output_dir(output, force, inputs=(source,))
    info = inspect_checkpoint(source)
    adapter, config = info.adapter, info.config
    scorer = get_scorer(method)
    scorer.parse_params(params)
    kept_count(routing_shape(adapter, config), ratio=ratio, keep=keep)
    if stats is not None and stats.header.config_hash != config_hash(config):
        raise MoecompressError("--stats were collected on a different model; re-run calibrate on this checkpoint")
    if stats is None:
        stats = calibrate(source, sources, num_samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
                          dtype=dtype, statistics=required_statistics(method, protect_super_experts), progress=progress)
    plan = plan_pruning(stats, adapter, config, method, ratio=ratio, keep=keep, params=params, domain=domain,
                        protect_super_experts=protect_super_experts)
    skeleton = _skeleton(config)
    params_before = sum(p.numel() for p in skeleton.parameters())
    removed = sum(plan.num_experts - n for n in plan.kept_counts().values())
    params_after = params_before - removed * _expert_numel(adapter, skeleton)
    bytes_before = info.bytes_on_disk
    if dry_run:
        estimate = int(bytes_before * params_after / max(params_before, 1))
        return PruneResult(plan, None, params_before, params_after, bytes_before, estimate)

    model, _ = load_model(source, dtype=dtype)
    pruned = adapter.drop(model, keep_experts=plan.keep)
    del model
    tokenizer = load_tokenizer(source)
    manifest = build_manifest("prune", method, plan.params, seed, source, config, stats, plan=plan.model_dump(
        exclude={"scores"}), loads_with="transformers.AutoModelForCausalLM.from_pretrained")
    with atomic_output_dir(output, force=force) as tmp:
        write_checkpoint(pruned, tokenizer, tmp, manifest, readme_for(plan, source))
        (tmp / "prune_plan.json").write_text(plan.model_dump_json(indent=2) + "\n")
    params_after = sum(p.numel() for p in pruned.parameters())
    return PruneResult(plan, Path(output), params_before, params_after, bytes_before, folder_bytes(output))
