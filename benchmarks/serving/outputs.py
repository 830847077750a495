"""The checkpoints the `serving` suite hands to vLLM: each fixture's stock-layout outputs, written by moecompress.

Per fixture, into a scratch folder (never the repository):

* ``unpruned``: the fixture folder as trained (no copy).
* ``pruned``: frequency pruning of 50% of the routed experts, uniform per layer, super-expert
  protection off (`plan_pruning` + `write_pruned`, as `moecompress prune` writes it).
* ``condensed``: CD-MoE condensing of half the MoE layers (rounded up) to top_k experts each, in
  the stock transformers layout (`condense_checkpoint(..., layout="transformers")`). Where the
  config can only make a prefix of the layers dense (DeepSeek-V3), the first MoE layers are
  condensed (the only choice a stock checkpoint holds), else the greedy search chooses them.
* ``fake-quant``: uniform 4-bit GPTQ of every routed expert (attention, shared and dense MLPs at
  the default 4 bits), written dequantised (``--format fake``): plain transformers loads it.
* ``gptq``: the same request written packed (``--format gptq``): GPTQModel / moecompress.load.

Calibration: the protocol's validation windows (the same as every suite). A writer that
moecompress itself refuses records its one-line error instead of a folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness.context import Fixture

KINDS = ("unpruned", "pruned", "condensed", "fake-quant", "gptq")
PRUNE_RATIO = 0.5
QUANT_BITS = 4


@dataclass
class Output:
    """One written output: where it is, which loader opens it, what it is (or why it was not written)."""

    kind: str
    label: str
    folder: Path | None
    loads_with: str | None
    error: str | None = None
    seconds: float = 0.0
    details: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"kind": self.kind, "label": self.label, "folder": str(self.folder) if self.folder else None,
                "loads_with": self.loads_with, "write_error": self.error, "write_seconds": round(self.seconds, 1),
                **(self.details or {})}


def write_pruned_output(fixture: Fixture, folder: Path) -> tuple[str, dict[str, Any]]:
    """Frequency pruning at `PRUNE_RATIO`, uniform; (loads_with, details)."""
    from moecompress.io.manifest import build_manifest
    from moecompress.prune.materialize import write_pruned
    from moecompress.prune.run import plan_pruning
    from moecompress.prune.request import PruneRequest

    model, adapter, stats = fixture.model, fixture.adapter, fixture.stats(("count",))
    plan = plan_pruning(stats, adapter, model.config, PruneRequest(method="frequency", ratio=PRUNE_RATIO,
                                                                   protect_super_experts=False))
    manifest = build_manifest("prune", plan.method, plan.params, fixture.protocol.calib_seed, fixture.folder,
                              model.config, stats, plan=plan.model_dump(exclude={"scores"}))
    written = write_pruned(model, adapter, plan, fixture.tokenizer, folder, manifest, fixture.folder)
    if written.format != "transformers":
        raise ValueError(f"moecompress wrote its own layout ({written.format}), not a stock checkpoint")
    return written.loads_with, {"kept_per_layer": next(iter(plan.kept_counts().values())),
                                "num_experts": plan.num_experts}


def write_condensed_output(fixture: Fixture, folder: Path) -> tuple[str, dict[str, Any]]:
    """CD-MoE on half the MoE layers, top_k experts each, stock layout; (loads_with, details)."""
    from moecompress.condense.run import LOADS_WITH, CondenseRequest, condense_checkpoint
    from moecompress.condense.transformers_layout import NotExpressible, dense_slots

    adapter, config, protocol = fixture.adapter, fixture.model.config, fixture.protocol
    moe_layers = [ref.index for ref in adapter.moe_layers(fixture.model)]
    count = math.ceil(len(moe_layers) / 2)
    try:
        prefix = dense_slots(config).kind == "prefix"
    except NotExpressible:
        prefix = False
    layers = moe_layers[:count] if prefix else None
    request = CondenseRequest(layers=layers, experts=adapter.top_k(config), num_layers=None if prefix else count,
                              layout="transformers", sources=fixture.calibration_sources(),
                              samples=protocol.calib_windows, seq_len=protocol.seq_len, seed=protocol.calib_seed,
                              batch_size=protocol.batch_size, timing=False)
    result = condense_checkpoint(fixture.folder, folder, request, progress=False)
    return LOADS_WITH[result.layout], {"condensed_layers": sorted(result.plan.layers),
                                       "selection": "first MoE layers" if prefix else "greedy",
                                       "experts_per_condensed_layer": adapter.top_k(config)}


def write_quantised_output(fixture: Fixture, folder: Path, fmt: str) -> tuple[str, dict[str, Any]]:
    """Uniform `QUANT_BITS`-bit GPTQ of the routed experts in format `fmt` (fake or gptq); (loads_with, details)."""
    from moecompress.quant.run import parse_request, quantize_checkpoint

    protocol = fixture.protocol
    request = parse_request(bits=QUANT_BITS, method="uniform", format=fmt, samples=protocol.calib_windows,
                            seq_len=protocol.seq_len, seed=protocol.calib_seed, batch_size=protocol.batch_size)
    result = quantize_checkpoint(fixture.folder, folder, request, sources=fixture.calibration_sources(),
                                 progress=False)
    loads_with = "transformers.AutoModelForCausalLM.from_pretrained" if fmt == "fake" else "moecompress.load"
    return loads_with, {"average_bits": result.average_bits, "format": result.format,
                        "group_size": request.settings.group_size}


def write_outputs(fixture: Fixture, workdir: Path, kinds: tuple[str, ...] = KINDS) -> list[Output]:
    """Write every output kind of `fixture` under `workdir` (refusals recorded, not raised)."""
    from moecompress.errors import MoecompressError

    top_k = fixture.adapter.top_k(fixture.model.config)
    writers: dict[str, tuple[str, Callable[[Path], tuple[str, dict[str, Any]]]]] = {
        "pruned": (f"pruned {PRUNE_RATIO:.0%} (frequency, uniform)", lambda out: write_pruned_output(fixture, out)),
        "condensed": (f"condensed (half the MoE layers, {top_k} experts)",
                      lambda out: write_condensed_output(fixture, out)),
        "fake-quant": (f"fake-quant {QUANT_BITS}-bit (uniform)", lambda out: write_quantised_output(fixture, out, "fake")),
        "gptq": (f"GPTQ {QUANT_BITS}-bit (uniform)", lambda out: write_quantised_output(fixture, out, "gptq")),
    }
    outputs = []
    for kind in kinds:
        if kind == "unpruned":
            outputs.append(Output(kind, "unpruned", fixture.folder, "transformers.AutoModelForCausalLM.from_pretrained"))
            continue
        label, write = writers[kind]
        folder = workdir / kind
        started = time.perf_counter()
        try:
            loads_with, details = write(folder)
            outputs.append(Output(kind, label, folder, loads_with, seconds=time.perf_counter() - started,
                                  details=details))
        except (MoecompressError, ValueError) as err:
            outputs.append(Output(kind, label, None, None, error=f"{type(err).__name__}: {err}".splitlines()[0],
                                  seconds=time.perf_counter() - started))
        print(f"[serving] {fixture.name}: wrote {kind} in {time.perf_counter() - started:.0f} s"
              + (f" (refused: {outputs[-1].error})" if outputs[-1].error else ""), flush=True)
    return outputs
