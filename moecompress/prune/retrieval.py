"""`route-task`: pick the stored PreMoe pattern nearest to a prompt file and write that pruned model.

PreMoe TAER (arXiv 2505.17639): the query's first-MoE-layer TCESS vector, computed with the
same options as the stored patterns, is compared (L2) with every stored task's vector; the
nearest task's kept experts are materialised like any uniform prune plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moecompress.errors import MoecompressError
from moecompress.prune.patterns import ExpertPatterns, load_patterns, nearest_pattern
from moecompress.prune.plan import PrunePlan

MAX_PROMPT_TOKENS = 4096


@dataclass
class RouteResult:
    """The chosen pattern, every distance, and where the checkpoint went."""

    domain: str
    distances: dict[str, float]
    plan: PrunePlan
    output: Path | None
    tokens: int
    notice: str | None = None
    tcess: list[float] = field(default_factory=list)


def read_prompts(path: str | Path, text_field: str = "text") -> list[str]:
    """The prompts of a local .txt / .jsonl / .parquet file (documents as in calibration data)."""
    from moecompress.calibration.data import DomainSource, read_texts

    return read_texts(DomainSource(name="prompts", path=Path(path), field=text_field))


def prompt_batches(tokenizer: Any, prompts: list[str]) -> list[tuple[str, torch.Tensor]]:
    """One (1, L) batch per prompt, tokenised without special tokens, cut at MAX_PROMPT_TOKENS."""
    batches = []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_PROMPT_TOKENS]
        if ids:
            batches.append(("prompts", torch.tensor([ids], dtype=torch.long)))
    if not batches:
        raise MoecompressError("the prompts file yields no tokens; give it at least one non-empty prompt")
    return batches


def query_tcess(model: Any, adapter: Any, batches: list[tuple[str, torch.Tensor]], patterns: ExpertPatterns,
                progress: bool = True) -> tuple[torch.Tensor, int]:
    """The prompts' first-MoE-layer TCESS vector (E,) with the patterns' options, and the token count."""
    from moecompress.prune.tcess import collect_tcess

    top_k = int(patterns.params.get("top_k", 1))
    threshold = patterns.params.get("threshold")
    sums, tokens = collect_tcess(model, adapter, batches, top_k, threshold, first_layer_only=True, progress=progress)
    first = adapter.moe_layers(model)[0].index
    if first != patterns.first_layer:
        raise MoecompressError(f"the patterns' first MoE layer is {patterns.first_layer}, the model's {first}")
    total = sum(tokens.values())
    return sums[first]["prompts"] / max(total, 1), total


def route_task(prompts: str | Path, patterns_path: str | Path, output: str | Path | None,
               model_path: str | Path | None = None, text_field: str = "text", dtype: str = "float32",
               force: bool = False, progress: bool = True) -> RouteResult:
    """Choose the nearest stored pattern for the prompts and write its pruned checkpoint to `output`."""
    from moecompress.io.provenance import config_hash
    from moecompress.io.manifest import build_manifest
    from moecompress.io.output import check_output_dir
    from moecompress.models.load import inspect_checkpoint, load_model, load_tokenizer
    from moecompress.prune.materialize import write_pruned

    patterns = load_patterns(patterns_path)
    source = Path(model_path) if model_path is not None else Path(patterns.source)
    if output is not None:
        check_output_dir(output, force, inputs=(source,))
    info = inspect_checkpoint(source)
    if config_hash(info.config) != patterns.config_hash:
        raise MoecompressError(f"{patterns_path} was made for a different model than {source}; pass --model with "
                               "the checkpoint the patterns were built on")
    texts = read_prompts(prompts, text_field)
    tokenizer = load_tokenizer(source)
    batches = prompt_batches(tokenizer, texts)
    model, adapter = load_model(source, dtype=dtype)
    tcess, tokens = query_tcess(model, adapter, batches, patterns, progress)
    domain, distances = nearest_pattern(patterns, tcess)
    chosen = patterns.patterns[domain]
    plan = PrunePlan(method="premoe", params=patterns.params, allocation="uniform", domain=domain,
                     num_experts=patterns.num_experts, top_k=patterns.top_k, keep=chosen.keep,
                     protected=patterns.protected)
    result = RouteResult(domain, distances, plan, None, tokens, tcess=[float(v) for v in tcess])
    if output is None:
        return result
    manifest = build_manifest("route-task", "premoe", patterns.params, None, source, info.config,
                              plan=plan.model_dump(exclude={"scores"}),
                              retrieval={"patterns": str(patterns_path), "chosen": domain, "distances": distances,
                                         "prompt_tokens": tokens, "patterns_stats_digest": patterns.stats_digest})
    written = write_pruned(model, adapter, plan, tokenizer, output, manifest, source, force=force)
    result.output, result.notice = written.path, written.notice
    return result
