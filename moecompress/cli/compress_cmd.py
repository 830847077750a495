"""`moecompress compress`: joint expert pruning and mixed-precision quantisation under one size budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moecompress.cli.app import app
from moecompress.cli.options import (
    BatchSizeOption,
    DataOption,
    DeviceOption,
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


@app.command("compress")
def compress_command(
    model: ModelArg,
    output: OutputOption,
    size: SizeOption = None,
    bits: BitsOption = None,
    prune_method: Annotated[str, typer.Option("--prune-method", help="Pruning score that prices dropping an "
                                              "expert: reap, frequency, soft_count, ean, easy_ep, ...")] = "reap",
    param: Annotated[list[str] | None, typer.Option("--param", help="Pruning-method parameter key=value "
                                                    "(repeatable).", show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="Quantisation costs: mc-moe (block-output "
                                        "errors) or gemq (gradient-weighted, from a layer-streamed backward pass).")] = "mc-moe",
    candidates: CandidatesOption = None,
    require_top: Annotated[int, typer.Option("--require-top", min=0, help="Each MoE layer keeps at least one "
                                             "expert at each of this many widest widths.")] = 1,
    stats: Annotated[Path | None, typer.Option("--stats", help="Reuse statistics from `moecompress calibrate`.",
                                               show_default=False)] = None,
    no_protect_super_experts: Annotated[bool, typer.Option("--no-protect-super-experts",
                                                           help="Allow dropping super experts.")] = False,
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
    data: DataOption = None,
    field: FieldOption = "text",
    samples: SamplesOption = 32,
    seq_len: SeqLenOption = 256,
    seed: SeedOption = 0,
    batch_size: BatchSizeOption = 8,
    time_limit: Annotated[float, typer.Option("--time-limit", help="Seconds the integer program may run.")] = 120.0,
    expert_memory: ExpertMemory = "512MiB",
    device: DeviceOption = "cpu",
    as_json: JsonOption = False,
    force: ForceOption = False,
    resume: ResumeOption = False,
    print_step: PrintStepOption = False,
) -> None:
    """Drop and quantise routed experts together: each expert gets {drop, 2, 3, 4} bits under one budget.

    One integer program prices dropping an expert with its pruning score (scaled to the measured
    cost of removing it) and quantising it with its sensitivity; every layer keeps the same
    number of experts (>= top-k, super experts protected), so the output loads like any
    `quantize` output. --size is the GPTQ checkpoint's size (bytes, or % of the input).

    Example:

        moecompress compress ./Qwen3-30B-A3B --size 40% --data code=code.jsonl -o ./small
    """
    if print_step:
        from moecompress.cli.recipe_bridge import echo_step

        return echo_step("compress", locals())
    from moecompress.calibration.data import parse_data_specs
    from moecompress.calibration.stats import RoutingStats
    from moecompress.cli.prune_cmd import parse_params
    from moecompress.models.load import load_config
    from moecompress.compress.joint import JointPruning, compress_checkpoint
    from moecompress.quant.run import parse_request

    request = parse_request(
        bits=bits, size=size, method=method, candidate_bits=parse_candidates(candidates), require_top=require_top,
        format=fmt, settings=settings_from_options(locals()),
        weighted_hessian=weighted_hessian, min_tokens=min_tokens, samples=samples, seq_len=seq_len, seed=seed,
        batch_size=batch_size, time_limit=time_limit, expert_memory=parse_expert_memory(expert_memory),
        device=device,
    )
    loaded_stats = RoutingStats.load(stats, expect_config=load_config(model)) if stats is not None else None
    sources = parse_data_specs(data, field=field) if data else None
    pruning = JointPruning(method=prune_method, params=parse_params(param),
                           protect_super_experts=not no_protect_super_experts, stats=loaded_stats)
    result, _ = compress_checkpoint(model, output, request, pruning, sources=sources, force=force,
                                    progress=not as_json, resume=resume)
    if as_json:
        typer.echo(json.dumps(result_summary(result), indent=2))
    else:
        print_quant_summary(result)
