"""Options and the summary printer shared by `moecompress quantize` and `compress`.

Their parsers (`parse_candidates`, `parse_expert_memory`, `settings_from_options`) live in
`moecompress.quant.settings`, which the recipe steps use too (recipes never import the CLI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table


BitsOption = Annotated[float | None, typer.Option(
    "--bits", help="Average bits per routed-expert weight (e.g. 2.5); scales and zeros are reported separately.",
    show_default=False)]
SizeOption = Annotated[str | None, typer.Option(
    "--size", help="Target size of the GPTQ checkpoint instead of --bits: 4GB, 3.5GiB or a percentage like 40%.",
    show_default=False)]
CandidatesOption = Annotated[str | None, typer.Option(
    "--candidates", help="Comma-separated candidate widths for routed experts (default 2,3,4; 4,8 with "
    "--uniform-per-layer; 1 needs --format fake).", show_default=False)]
ExpertMemory = Annotated[str, typer.Option("--expert-memory", help="Memory for per-expert state of one MoE layer "
                                           "(Hessians, candidate copies); layers needing more are done in several "
                                           "passes (same result).")]
FormatOption = Annotated[str, typer.Option("--format", help="gptq (packed, GPTQModel / moecompress.load) or fake "
                                           "(dequantised weights, plain transformers).")]


# Options shared by `quantize` and `compress` (role bits and the quantisation grid).
AttentionBits = Annotated[int, typer.Option("--attention-bits", help="Bits of attention maps (16 = unquantised).")]
SharedBits = Annotated[int, typer.Option("--shared-bits", help="Bits of shared experts (16 = unquantised).")]
DenseBits = Annotated[int, typer.Option("--dense-bits", help="Bits of dense MLP layers (16 = unquantised).")]
HeadBits = Annotated[int, typer.Option("--lm-head-bits", help="Bits of the output head, round-to-nearest "
                                       "(16 = unquantised).")]
GroupSize = Annotated[int, typer.Option("--group-size", help="Input columns per scale/zero group (-1 = per channel).")]
Asym = Annotated[bool, typer.Option("--asym", help="Asymmetric grids (written as GPTQ v2 zero points).")]
ActOrder = Annotated[bool, typer.Option("--act-order", help="GPTQ act-order (columns by decreasing Hessian "
                                        "diagonal; g_idx stored).")]
GroupAware = Annotated[bool, typer.Option("--group-aware/--no-group-aware", help="GPTQ group-aware reordering "
                                          "(GAR): columns by decreasing Hessian diagonal inside each group, groups "
                                          "by their largest; g_idx stays sequential. Ignored with --act-order.")]
Damp = Annotated[float, typer.Option("--damp", help="GPTQ damping, a fraction of the mean Hessian diagonal "
                                     "(raised automatically when the Cholesky factorisation fails).")]
Rtn = Annotated[bool, typer.Option("--rtn", help="Round-to-nearest instead of GPTQ everywhere (baseline).")]
MinTokens = Annotated[int, typer.Option("--min-tokens", min=0, help="Experts routed fewer tokens fall back to "
                                        "round-to-nearest (listed in the report).")]
WeightedHessian = Annotated[bool, typer.Option("--weighted-hessian", help="Weight each token's contribution to an "
                                               "expert's Hessian by its gate value (MoEQuant).")]


def result_summary(result: Any) -> dict[str, Any]:
    """JSON-ready summary of a quantisation (or joint compression) result."""
    plan = result.plan
    return {
        "output": str(result.output),
        "format": result.format,
        "method": plan.method,
        "average_bits": result.average_bits,
        "effective_bits_per_parameter": result.effective_bits,
        "expert_bits": {str(k): v for k, v in plan.expert_bits().items()},
        "dropped": {str(k): v for k, v in plan.dropped.items()},
        "allocation": plan.allocation,
        "bytes_before": result.bytes_before,
        "bytes_after": result.bytes_after,
        "rtn_fallbacks": result.fallbacks,
    }


def print_quant_summary(result: Any, console: Console | None = None) -> None:
    """Bits histogram per layer, achieved average, effective bits, bytes before/after."""
    from moecompress.sizes import format_bytes

    console = console or Console()
    plan = result.plan
    widths = sorted({w for bits in plan.expert_bits().values() for w in bits})
    title = f"{plan.method}: routed-expert bits per MoE layer"
    table = Table(title=title)
    table.add_column("layer", justify="right")
    if plan.dropped:
        table.add_column("dropped", justify="right")
    for width in widths:
        table.add_column(f"{width}-bit" if width != 16 else "16 (kept)", justify="right")
    table.add_column("average", justify="right")
    for layer, bits in plan.expert_bits().items():
        row = [str(layer)]
        if plan.dropped:
            row.append(str(len(plan.dropped.get(layer, []))))
        row += [str(bits.count(w)) for w in widths]
        row.append(f"{sum(bits) / len(bits):.2f}")
        table.add_row(*row)
    console.print(table)
    console.print(f"achieved average: {result.average_bits:.3f} bits per routed-expert weight; effective bits "
                  f"(scales, zeros, g_idx counted): "
                  + ", ".join(f"{role} {value:.2f}" for role, value in result.effective_bits.items()))
    if plan.allocation:
        alloc = plan.allocation
        gap = alloc.get("gap")
        console.print(f"allocation: {alloc.get('scope')} program, {alloc.get('variables')} binaries, "
                      f"{alloc.get('solver')} {alloc.get('status')}"
                      f"{'' if gap is None else f' (gap {float(gap):.2e})'} in {alloc.get('seconds')} s")
    if result.fallbacks:
        console.print(f"{len(result.fallbacks)} expert(s) saw too few tokens and used round-to-nearest: "
                      + ", ".join(f"{name} ({tokens})" for name, tokens in list(result.fallbacks.items())[:8])
                      + (" ..." if len(result.fallbacks) > 8 else ""))
    console.print(f"bytes on disk: {format_bytes(result.bytes_before)} -> {format_bytes(result.bytes_after)} "
                  f"({result.format} format)")
    loader = ("moecompress.load(path) or GPTQModel.load(path)" if result.format == "gptq"
              else "AutoModelForCausalLM.from_pretrained(path)")
    console.print(f"written to {Path(result.output)}; open it with {loader}")
