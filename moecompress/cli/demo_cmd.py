"""`moecompress demo`: the whole flow on the small trained MoE that ships with moecompress."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moecompress.cli.app import app
from moecompress.errors import MoecompressError
from moecompress.prune.scorer_names import DEFAULT_PRUNE_METHOD

EXAMPLE_ROOT = Path(__file__).resolve().parents[1] / "example"
DEMO_MARKER = "DEMO.json"


def example_model_dir() -> Path:
    """The embedded example checkpoint (a small Qwen3-MoE trained on the shipped text)."""
    folder = EXAMPLE_ROOT / "model"
    if not (folder / "config.json").is_file():
        raise MoecompressError(f"the embedded example model is missing from {folder}; reinstall moecompress")
    return folder


def example_eval_sources() -> list:
    """Held-out evaluation text for the example model, one domain per .jsonl file."""
    from moecompress.calibration.data import DomainSource

    files = sorted((EXAMPLE_ROOT / "eval").glob("*.jsonl"))
    if not files:
        raise MoecompressError(f"the example's evaluation text is missing from {EXAMPLE_ROOT / 'eval'}; reinstall moecompress")
    return [DomainSource(name=f.stem, path=f, field="text") for f in files]


@app.command("demo")
def demo_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the demo's statistics and checkpoints.")]
    = Path("moecompress-demo"),
    method: Annotated[str, typer.Option("--method", "-m", help="Pruning method to show beside frequency.")] \
            = DEFAULT_PRUNE_METHOD,
    ratio: Annotated[float, typer.Option("--ratio", help="Fraction of routed experts to remove.")] = 0.5,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Calibration windows per domain.")] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="Tokens per window.")] = 128,
    windows: Annotated[int, typer.Option("--windows", min=1, help="Evaluation windows per domain.")] = 16,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")] = False,
) -> None:
    """Run calibrate -> prune -> evaluate on the embedded example model and print before/after perplexity.

    The example is a small Qwen3-MoE trained by moecompress's fixture builder on real text
    (Python source, technical prose, documentation); see moecompress/example/model/TRAINING.md.
    The pruned checkpoints are reloaded with plain `AutoModelForCausalLM.from_pretrained`
    before they are evaluated.

    Example:

        moecompress demo -o ./moecompress-demo
    """
    from transformers import AutoModelForCausalLM

    from moecompress.calibration.calibrate import calibrate
    from moecompress.calibration.request import CalibrationRequest
    from moecompress.calibration.data import default_calibration_sources
    from moecompress.cli.calibrate_cmd import print_stats_summary
    from moecompress.evaluate import evaluate_perplexity
    from moecompress.models.load import load_model, load_tokenizer
    from moecompress.prune.run import prune_checkpoint, required_statistics
    from moecompress.prune.request import PruneRequest

    console = Console()
    model_dir = example_model_dir()
    eval_sources = example_eval_sources()
    if output.exists() and any(output.iterdir()):
        if not (force or (output / DEMO_MARKER).is_file()):
            raise MoecompressError(f"output folder {str(output)!r} is not empty; pass --force or choose another -o")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    console.rule("1. calibrate: one observed pass, one decoder layer at a time")
    needs = sorted(set(required_statistics("frequency", True)) | set(required_statistics(method, True)))
    stats = calibrate(model_dir,
                      CalibrationRequest(sources=default_calibration_sources(), samples=samples, seq_len=seq_len,
                                         seed=0, statistics=needs))
    stats.save(output / "stats")
    print_stats_summary(stats, output / "stats", console)

    console.rule(f"2. prune {ratio:.0%} of routed experts (frequency baseline and {method})")
    checkpoints = {}
    for name in dict.fromkeys(["frequency", method]):
        result = prune_checkpoint(model_dir, output / f"pruned-{name}",
            PruneRequest(method=name, ratio=ratio), stats=stats, progress=True)
        checkpoints[name] = result.output
        console.print(f"{name}: {next(iter(result.plan.kept_counts().values()))}/{result.plan.num_experts} experts "
                      f"per layer kept, {result.params_before:,} -> {result.params_after:,} parameters")

    console.rule("3. evaluate: perplexity on held-out text (pruned models reloaded with transformers)")
    tokenizer = load_tokenizer(model_dir)
    reports = {}
    original, _ = load_model(model_dir)
    reports["original"] = evaluate_perplexity(original, tokenizer, eval_sources, seq_len=seq_len, max_windows=windows)
    for name, folder in checkpoints.items():
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        reports[f"{name} -{ratio:.0%}"] = evaluate_perplexity(model, tokenizer, eval_sources, seq_len=seq_len,
                                                              max_windows=windows)
    table = Table(title="Perplexity before and after pruning (lower is better)")
    table.add_column("model")
    domains = [r.domain for r in reports["original"].results]
    for domain in domains:
        table.add_column(domain, justify="right")
    table.add_column("mean", justify="right")
    for name, report in reports.items():
        table.add_row(name, *[f"{r.perplexity:.2f}" for r in report.results], f"{report.mean_perplexity:.2f}")
    console.print(table)
    first = reports["original"].results[0]
    console.print(f"{first.windows} windows of {seq_len} tokens per domain; total time {time.perf_counter() - started:.0f} s")
    summary = {name: report.to_dict() for name, report in reports.items()}
    (output / DEMO_MARKER).write_text(json.dumps({"ratio": ratio, "method": method, "results": summary}, indent=2) + "\n")
    console.print(f"statistics, pruned checkpoints and results are in {output}")
