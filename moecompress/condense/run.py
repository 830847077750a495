"""Condensing end to end: calibration data -> search -> condensed model -> checkpoint + summary.

`condense_checkpoint` validates everything that needs no model first, builds the calibration
set, loads the model, searches experts (and layers), condenses in memory, measures the
forward time before and after on the CPU, and writes either a stock transformers checkpoint
(when the config can hold dense layers at the condensed positions) or moecompress's layout.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from moecompress.condense.plan import CRITERIA, CondensePlan
from moecompress.errors import MoecompressError

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "transformers", "moecompress")
LOADS_WITH = {
    "transformers": "transformers.AutoModelForCausalLM.from_pretrained",
    "moecompress": "moecompress.load",
}


@dataclass
class CondenseResult:
    """What `condense_checkpoint` did (or, for a dry run, would do)."""

    plan: CondensePlan
    layout: str  # "transformers" or "moecompress"
    layout_note: str | None  # why --layout auto fell back to moecompress's layout
    output: Path | None
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    forward_ms_before: float | None
    forward_ms_after: float | None
    timing_shape: tuple[int, int]
    threads: int
    dense_info: dict[str, Any] = field(default_factory=dict)


def parse_layers(value: str | None) -> list[int] | None:
    """`--layers`: "auto" (None) or a comma list of decoder indices with optional ranges ("3,5-7")."""
    if value is None or value.strip().lower() == "auto":
        return None
    layers: list[int] = []
    for part in value.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(p) for p in part.split("-", 1))
                layers.extend(range(low, high + 1))
            elif part:
                layers.append(int(part))
        except ValueError:
            raise MoecompressError(f"--layers {value!r}: use auto or decoder indices like 3,5,7 or 3-5") from None
    if not layers:
        raise MoecompressError(f"--layers {value!r} lists no layer; use auto or e.g. 3,5,7")
    return sorted(set(layers))


@torch.no_grad()
def compare_forward_ms(model: nn.Module, final: nn.Module | None,
                       condensed: Callable[[], contextlib.AbstractContextManager], input_ids: torch.Tensor,
                       repeats: int = 5) -> tuple[float, float]:
    """(before, after) best wall time in ms of a forward pass on `input_ids` (B, S).

    `model` is the original; the condensed model is `final` if given, else `model` inside the
    `condensed()` context. Runs alternate between the two after one warm-up each, so load from
    other work on a shared CPU hits both alike; the minimum is kept (other work only adds time).
    """
    def run(which: str) -> float:
        with (condensed() if which == "after" and final is None else contextlib.nullcontext()):
            target = final if which == "after" and final is not None else model
            start = time.perf_counter()
            target(input_ids=input_ids, use_cache=False)
            return (time.perf_counter() - start) * 1000

    run("before"), run("after")
    times: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(repeats):
        for which in ("before", "after"):
            times[which].append(run(which))
    return min(times["before"]), min(times["after"])


def count_params(model: nn.Module) -> int:
    """Parameters of a model (tied ones once)."""
    return sum(p.numel() for p in model.parameters())


def readme_for(plan: CondensePlan, source: Path, layout: str, note: str | None) -> str:
    """The README written into a condensed checkpoint."""
    layers = ", ".join(map(str, sorted(plan.layers)))
    text = (
        "# Condensed with moecompress (CD-MoE)\n\n"
        f"Source: `{source}`. MoE layers {layers} are condensed (arXiv 2412.00069): each has no router choice "
        f"any more; every token goes through the same {plan.experts_per_layer} routed experts with fixed weights "
        "(their mean gate over the calibration tokens) plus the shared experts. Experts chosen by the "
        f"`{plan.criterion}` criterion, layers "
        f"{'given explicitly' if plan.layer_selection == 'explicit' else 'chosen greedily'}.\n\n"
    )
    if layout == "transformers":
        text += ("Each condensed layer is stored as an ordinary dense MLP layer of the stock architecture (the config's "
                 "dense-layer list and width are patched; narrower dense layers are zero-padded, which is exact), so this "
                 "folder loads with plain `transformers.AutoModelForCausalLM.from_pretrained` (no remote code).\n\n")
    else:
        text += ("This folder uses moecompress's condensed layout (`moecompress_layout.json`): the config cannot express "
                 f"dense layers at these positions{f' ({note})' if note else ''}. Load it with\n\n"
                 "```python\nimport moecompress\nmodel = moecompress.load(path)\n```\n\n"
                 "Plain `from_pretrained` does not open it.\n\n")
    text += ("`moecompress_manifest.json` records the parameters, the condensed layers with their experts and weights, "
             "the calibration data digest, the seed and library versions; `condense_plan.json` holds the full search "
             "record.\n")
    return text


class CondenseRequest(BaseModel):
    """The options of one condensing run (`moecompress condense`, the recipe's condense step)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    layers: list[int] | None = None  # decoder indices to condense; None: chosen greedily
    experts: int = 2  # routed experts kept per condensed layer
    num_layers: int | None = None  # how many layers the greedy search condenses (default half the MoE layers)
    criterion: str = "recon"
    layout: str = "auto"
    sources: list[Any] | None = None  # DomainSource list; None: the shipped calibration sets
    samples: int = 32
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    dtype: str = "float32"
    timing: bool = True  # time a forward pass before and after


def condense_checkpoint(checkpoint: str | Path, output: str | Path | None, request: CondenseRequest,
                        dry_run: bool = False, force: bool = False, progress: bool = True) -> CondenseResult:
    """Search, condense and write `checkpoint` to `output` (see the module docstring).

    request.layers: decoder indices to condense, or None to choose `num_layers` greedily
    (default half the MoE layers). request.experts: routed experts kept per condensed layer.
    request.layout: "auto" writes a stock checkpoint when the config allows it, else
    moecompress's layout; "transformers" refuses when it cannot. The input checkpoint is never
    modified.
    """
    from moecompress.calibration.data import build_calibration_set, default_calibration_sources
    from moecompress.condense.apply import (
        build_condensed_modules,
        moe_layer_map,
        swapped_experts,
        write_moecompress_layout,
    )
    from moecompress.condense.cd_moe import check_condensable
    from moecompress.io.checkpoint import cast_model
    from moecompress.condense.search import resolve_layers, search_condensation
    from moecompress.condense.transformers_layout import NotExpressible, dense_layout_problem, to_transformers_model
    from moecompress.io.checkpoint import folder_bytes, write_checkpoint
    from moecompress.io.manifest import build_manifest
    from moecompress.io.output import atomic_output_dir, check_output_dir
    from moecompress.io.stored_formats import StoredTensors, linear_weight_names, open_tensors, restore_stored_format
    from moecompress.models.load import inspect_checkpoint, load_model, load_tokenizer
    from moecompress.sizes import checkpoint_dtype, skeleton_model

    layers, experts, num_layers, criterion = request.layers, request.experts, request.num_layers, request.criterion
    layout, seed = request.layout, request.seed
    source = Path(checkpoint)
    if criterion not in CRITERIA:
        raise MoecompressError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if layout not in LAYOUTS:
        raise MoecompressError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if not dry_run:
        if output is None:
            raise MoecompressError("pass -o/--output for the condensed checkpoint (or --dry-run)")
        check_output_dir(output, force, inputs=(source,))
    info = inspect_checkpoint(source)
    adapter, config = info.adapter, info.config
    total = adapter.num_experts(config)
    if not 1 <= experts <= total:
        raise MoecompressError(f"--experts must be between 1 and the {total} routed experts; got {experts}")
    skeleton = skeleton_model(config)
    searched, _ = resolve_layers(adapter, skeleton, layers, num_layers)
    for ref in adapter.moe_layers(skeleton):
        if ref.index in searched:
            check_condensable(adapter, ref)
    if layout == "transformers" and layers is not None:
        problem = dense_layout_problem(skeleton, adapter, layers)
        if problem:
            raise MoecompressError(f"--layout transformers: {problem}; use --layout moecompress")
    del skeleton

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(source)
    calib = build_calibration_set(tokenizer, list(request.sources) if request.sources else
                                  default_calibration_sources(), num_samples=request.samples,
                                  seq_len=request.seq_len, seed=seed)
    model, _ = load_model(source, dtype=request.dtype)
    batches = list(calib.domain_batches(request.batch_size))
    timing_ids = batches[0][1]
    params_before = count_params(model)

    plan = search_condensation(model, adapter, batches, experts, layers=layers, num_layers=num_layers,
                               criterion=criterion, progress=progress)
    refs = moe_layer_map(adapter, model)
    modules = build_condensed_modules(model, adapter, plan.condensed(), refs)

    def condensed() -> contextlib.AbstractContextManager:
        return swapped_experts(refs, modules)

    final, chosen_layout, note, dense_info = None, "moecompress", None, {}
    if layout in ("auto", "transformers"):
        try:
            with condensed():
                final, dense_info = to_transformers_model(model, adapter, plan.layers)
            chosen_layout = "transformers"
        except NotExpressible as err:
            if layout == "transformers":
                raise MoecompressError(f"--layout transformers: {err}; use --layout moecompress") from None
            note = str(err)
            log.info("writing moecompress's condensed layout: %s", note)
    if final is not None:
        params_after = count_params(final)
    else:
        with condensed():
            params_after = count_params(model)
    ms_before = ms_after = None
    if request.timing:
        ms_before, ms_after = compare_forward_ms(model, final, condensed, timing_ids)
    save_dtype = checkpoint_dtype(info) or next(model.parameters()).dtype
    common = dict(plan=plan, layout=chosen_layout, layout_note=note, params_before=params_before,
                  params_after=params_after, bytes_before=info.bytes_on_disk, forward_ms_before=ms_before,
                  forward_ms_after=ms_after, timing_shape=tuple(timing_ids.shape), threads=torch.get_num_threads(),
                  dense_info=dense_info)
    if dry_run:
        estimate = int(info.bytes_on_disk * params_after / max(params_before, 1))
        return CondenseResult(output=None, bytes_after=estimate, **common)

    params = {"experts": experts, "layers": "auto" if layers is None else layers, "num_layers": len(plan.layers),
              "criterion": criterion, "layout": chosen_layout}
    manifest = build_manifest(
        "condense", "cd_moe", params, seed, source, config, None,
        plan=plan.model_dump(include={"layers", "experts", "weights", "criterion", "layer_selection",
                                      "experts_per_layer", "num_experts", "top_k", "tokens", "cost"}),
        layout=chosen_layout, loads_with=LOADS_WITH[chosen_layout], calibration=calib.record(),
        dense=dense_info or None)
    readme = readme_for(plan, source, chosen_layout, note)
    stored = open_tensors(info.weight_files, info.config)
    with atomic_output_dir(output, force=force) as tmp:
        if chosen_layout == "transformers":
            write_checkpoint(cast_model(final, save_dtype), tokenizer, tmp, manifest, readme)
            if isinstance(stored, StoredTensors):  # the input's FP8 / MXFP4 format, changed matrices re-quantised
                restore_stored_format(tmp, stored, linear_weight_names(final))
                with open(tmp / "README.md", "a") as handle:
                    handle.write(f"\nThe weights are stored like the input's, in {stored.format.describe()}: "
                                 "unchanged matrices are copied byte for byte, the condensed layers' matrices "
                                 "are re-quantised with the input's block size.\n")
        else:
            with condensed():
                write_moecompress_layout(cast_model(model, save_dtype), adapter, plan.condensed(), tokenizer, tmp,
                                         manifest, readme)
        (tmp / "condense_plan.json").write_text(plan.model_dump_json(indent=2) + "\n")
    return CondenseResult(output=Path(output), bytes_after=folder_bytes(output), **common)
