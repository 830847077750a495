"""`moecompress quantize`: mixed-precision GPTQ with a bit-width per routed expert."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from moecompress.cli.app import app
from moecompress.cli.options import (
    BatchSizeOption,
    DataOption,
    DeviceOption,
    DtypeOption,
    FieldOption,
    ForceOption,
    JsonOption,
    ModelArg,
    OutputOption,
    PrintStepOption,
    ResumeOption,
    SamplesOption,
    SeedOption,
    SeqLenOption,
)
from moecompress.cli.quant_options import (
    ActOrder,
    Asym,
    AttentionBits,
    BitsOption,
    CandidatesOption,
    Damp,
    DenseBits,
    ExpertMemory,
    FormatOption,
    GroupAware,
    GroupSize,
    HeadBits,
    MinTokens,
    Rtn,
    SharedBits,
    SizeOption,
    WeightedHessian,
    print_quant_summary,
    result_summary,
)
from moecompress.quant.settings import parse_candidates, parse_expert_memory, settings_from_options

@app.command("quantize")
def quantize_command(
    model: ModelArg,
    output: OutputOption,
    bits: BitsOption = None,
    size: SizeOption = None,
    method: Annotated[str, typer.Option("--method", "-m", help="mc-moe (block-output errors, per-layer programs), "
                                        "gemq (gradient-weighted errors from a backward pass streamed one "
                                        "layer at a time, one global program; the default: the best measured) "
                                        "or uniform.")] = "gemq",
    allocation: Annotated[str | None, typer.Option("--allocation", help="layer or global program (default: layer "
                                                   "for mc-moe, global for gemq).", show_default=False)] = None,
    candidates: CandidatesOption = None,
    require_top: Annotated[int, typer.Option("--require-top", min=0, help="Each MoE layer keeps at least one expert "
                                             "at each of this many widest widths.")] = 1,
    uniform_per_layer: Annotated[bool, typer.Option("--uniform-per-layer", help="Same width for every expert of a "
                                                    "layer (runtimes like vLLM cannot mix bits in one MoE "
                                                    "layer).")] = False,
    fmt: FormatOption = "gptq",
    attention_bits: AttentionBits = 4,
    shared_bits: SharedBits = 4,
    dense_bits: DenseBits = 4,
    lm_head_bits: HeadBits = 16,
    group_size: GroupSize = 128,
    asym: Asym = False,
    act_order: ActOrder = False,
    group_aware: GroupAware = True,
    damp: Damp = 0.01,
    rtn: Rtn = False,
    min_tokens: MinTokens = 16,
    weighted_hessian: WeightedHessian = False,
    sensitivity_quantizer: Annotated[str, typer.Option("--sensitivity-quantizer", help="How candidate widths are "
                                                       "simulated when measuring costs: rtn (fast) or gptq.")] = "rtn",
    data: DataOption = None,
    field: FieldOption = "text",
    samples: SamplesOption = 32,
    seq_len: SeqLenOption = 256,
    seed: SeedOption = 0,
    batch_size: BatchSizeOption = 8,
    streaming: Annotated[bool, typer.Option("--streaming", help="Insist on reading the checkpoint one decoder layer "
                                            "at a time (already the default; refused for architectures whose layers "
                                            "pass state between them).")] = False,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "cpu",
    time_limit: Annotated[float, typer.Option("--time-limit", help="Seconds the integer program may run; a "
                                              "time-limited solve reports its gap.")] = 120.0,
    expert_memory: ExpertMemory = "512MiB",
    as_json: JsonOption = False,
    force: ForceOption = False,
    resume: ResumeOption = False,
    print_step: PrintStepOption = False,
) -> None:
    """Quantise routed experts to mixed bit-widths chosen by an integer program (average --bits or --size).

    Attention, shared experts and dense MLPs get their own fixed widths (default 4 bits); routers,
    norms and embeddings stay unquantised. GPTQ runs one decoder layer at a time on cached
    calibration activations, reading the checkpoint one layer at a time (GEMQ's backward pass
    too: each layer is recomputed and backpropagated in turn). Accepts checkpoints `moecompress
    prune` wrote.

    Example:

        moecompress quantize ./Qwen3-30B-A3B --bits 2.5 --data code=code.jsonl -o ./q25
    """
    if print_step:
        from moecompress.cli.recipe_bridge import echo_step

        return echo_step("quantize", locals())
    from moecompress.calibration.data import parse_data_specs
    from moecompress.quant.run import parse_request, quantize_checkpoint

    request = parse_request(
        bits=bits, size=size, method=method, allocation=allocation, candidate_bits=parse_candidates(candidates),
        require_top=require_top, uniform_per_layer=uniform_per_layer, format=fmt,
        settings=settings_from_options(locals()),
        sensitivity_quantizer=sensitivity_quantizer, weighted_hessian=weighted_hessian, min_tokens=min_tokens,
        samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size, streaming=streaming, dtype=dtype,
        device=device, time_limit=time_limit, expert_memory=parse_expert_memory(expert_memory),
    )
    sources = parse_data_specs(data, field=field) if data else None
    result = quantize_checkpoint(model, output, request, sources=sources, force=force, progress=not as_json,
                                 resume=resume)
    if as_json:
        typer.echo(json.dumps(result_summary(result), indent=2))
    else:
        print_quant_summary(result)
