"""`moecompress eval`: perplexity per text domain on fixed, non-overlapping windows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moecompress.cli.app import app
from moecompress.cli.options import (
    BatchSizeOption,
    DataOption,
    DtypeOption,
    FieldOption,
    ForceOption,
    JsonOption,
    ModelArg,
    PrintStepOption,
    SeqLenOption,
    StreamingOption,
)
from moecompress.errors import MoecompressError


def _print_report(report) -> None:  # noqa: ANN001
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Perplexity of {report.model_path} (seq_len {report.seq_len})")
    table.add_column("domain")
    table.add_column("windows", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("perplexity", justify="right")
    for result in report.results:
        table.add_row(result.domain, str(result.windows), str(result.tokens), f"{result.perplexity:.4f}")
    table.add_row("mean", "", "", f"{report.mean_perplexity:.4f}", style="bold")
    Console().print(table)


@app.command("eval")
def eval_command(
    model: ModelArg,
    data: DataOption = None,
    field: FieldOption = "text",
    seq_len: SeqLenOption = 256,
    windows: Annotated[
        int, typer.Option("--windows", min=1, help="Windows per domain: the first N of its token stream.")
    ] = 32,
    batch_size: BatchSizeOption = 8,
    dtype: DtypeOption = "float32",
    streaming: StreamingOption = False,
    json_out: Annotated[
        Path | None,
        typer.Option("--json-out", help="Also write the results as JSON to this file.", show_default=False),
    ] = None,
    force: ForceOption = False,
    json_output: JsonOption = False,
    print_step: PrintStepOption = False,
) -> None:
    """Perplexity of a checkpoint on each text domain, and their mean.

    Each domain's text is tokenized with the checkpoint's tokenizer into one stream, cut into
    non-overlapping windows of --seq-len tokens, and the first --windows windows are scored
    (deterministic, so runs and models are comparable). Without --data the shipped
    calibration sets are used. Results print as a table; --json prints JSON instead and
    --json-out FILE also saves it (nothing is written otherwise).

    Examples:

    * `moecompress eval ./my-moe --data code=stdlib.txt --data prose=docs.jsonl`
    * `moecompress eval ./my-moe-pruned --seq-len 512 --windows 64 --json-out pruned-eval.json`
    """
    if print_step:
        from moecompress.cli.recipe_bridge import echo_step

        return echo_step("eval", locals())
    from moecompress.calibration.data import default_calibration_sources, parse_data_specs
    from moecompress.engine import distributed
    from moecompress.evaluate import evaluate_perplexity
    from moecompress.loader import open_for_evaluation
    from moecompress.models.load import load_tokenizer

    # under torchrun every rank scores its share of the windows and rank 0 reports: docs/distributed.md
    distributed.initialise("cpu")
    with distributed.phase("reading the arguments"):
        if json_out is not None:
            if json_out.is_dir():
                raise MoecompressError(f"--json-out {json_out} is a folder; give a file name such as "
                                       f"{json_out / 'eval.json'}")
            if json_out.exists() and not force:
                raise MoecompressError(f"{json_out} exists; pass --force to overwrite it")
        sources = parse_data_specs(data, field=field) if data else default_calibration_sources()
    with distributed.phase("loading the checkpoint"):
        loaded, reader = open_for_evaluation(model, dtype, streaming)  # stock, pruned-layout, condensed or GPTQ
        tokenizer = load_tokenizer(model)
    report = evaluate_perplexity(
        loaded,
        tokenizer,
        sources,
        seq_len=seq_len,
        max_windows=windows,
        batch_size=batch_size,
        progress=distributed.is_writer(),
        reader=reader,
    )
    report.model_path = str(model)
    report.extra["dtype"] = dtype
    report.extra["streaming"] = streaming
    report.extra["world_size"] = distributed.world_size()
    report.extra["data"] = [{"name": s.name, "path": str(s.path), "field": s.field} for s in sources]
    payload = json.dumps(report.to_dict(), indent=2)
    if not distributed.is_writer():
        return
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(payload + "\n")
    if json_output:
        typer.echo(payload)
    else:
        _print_report(report)
        if json_out is not None:
            typer.echo(f"saved {json_out}")
