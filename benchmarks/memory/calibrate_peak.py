"""Peak memory of the layer-at-a-time calibration pass versus the checkpoint's size on disk.

Builds a synthetic Qwen3-MoE of a few hundred MB to a few GB (random weights are fine for
cost), saves it as sharded safetensors, then runs `moecompress calibrate` in a fresh process
and reads that process's peak RSS. Loading the whole model gives a ratio of 1 or more;
streaming one decoder layer at a time should give a small fraction.

    python -m benchmarks.memory.calibrate_peak [--layers 16] [--hidden 1024] [--experts 32] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def build_checkpoint(folder: Path, layers: int, hidden: int, experts: int, width: int) -> int:
    """Save a random bf16 Qwen3-MoE with a tokenizer; return bytes on disk. Runs in a child process."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from tests.tiny_tokenizer import save_tokenizer

    tokenizer = save_tokenizer(folder, vocab_size=300)
    config = Qwen3MoeConfig(hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=width,
                            num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                            head_dim=hidden // 8, num_experts=experts, num_experts_per_tok=4,
                            vocab_size=len(tokenizer), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="200MB")
    del model
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


REPO = Path(__file__).resolve().parents[2]

# The child reports VmHWM, the peak RSS of its own process image (`peak_rss`); getrusage's
# ru_maxrss would also carry the parent's peak across fork and exec, so a large harness process
# would mask the child's.
# The child also samples the anonymous and file-backed parts of its RSS (`RssSampler`): the
# memory-mapped checkpoint shards count in RSS but are clean pages the kernel can drop.
_START_SAMPLER = """
from benchmarks.harness.peak_memory import RssSampler
_sampler = RssSampler().start()
"""
_REPORT_PEAK = """
from benchmarks.harness.peak_memory import peak_rss
_parts = _sampler.stop()
print("PEAK_BYTES", peak_rss(), _parts["anon"], _parts["file"])
"""

_CLI = """
import sys
from moecompress.cli.app import main
sys.argv = ["moecompress", *sys.argv[1:]]
try:
    main()
except SystemExit as exit_:
    if exit_.code:
        raise
"""

# The baseline: an interpreter that imported what `calibrate` imports (torch, transformers, the
# checkpoint's model class, moecompress's loader and calibration code) and did nothing else. The
# model class matters: transformers' modelling modules import its kernel integrations, which with
# optional extras installed (kernels, torchao) cost about 100 MB on their own.
IMPORT_BASELINE = """
import torch, transformers
from transformers import AutoModelForCausalLM
import transformers.models.qwen3_moe.modeling_qwen3_moe
import moecompress.calibration.calibrate, moecompress.models.load
"""

# Opening the checkpoint for the layer engine alone (what `calibrate` does before its layer pass: the
# meta-device skeleton and the disk -> module key map), on top of the baseline's imports.
LOAD_ONLY = IMPORT_BASELINE + """
import sys
from moecompress.engine.reader import CheckpointReader
CheckpointReader(sys.argv[1])
"""


def python_peaks(code: str, args: Sequence[str] = ()) -> dict[str, int]:
    """Run `code` in a fresh interpreter (with `args` as sys.argv[1:]); its peak RSS and peak anonymous and
    file-backed RSS, bytes ({"rss", "anon", "file"})."""
    done = subprocess.run([sys.executable, "-c", _START_SAMPLER + code + _REPORT_PEAK, *args], check=True,
                          capture_output=True, text=True, cwd=REPO)
    line = [row for row in done.stdout.splitlines() if row.startswith("PEAK_BYTES")][-1]
    rss, anon, file = (int(value) for value in line.split()[1:])
    return {"rss": rss, "anon": anon, "file": file}


def child_peaks(cli_args: list[str]) -> dict[str, int]:
    """Run `moecompress CLI_ARGS` in a fresh interpreter; its peaks as `python_peaks` gives them."""
    return python_peaks(_CLI, cli_args)


def measure(layers: int, hidden: int, experts: int, width: int, samples: int) -> dict[str, float]:
    """Build the synthetic checkpoint and calibrate it, each in a fresh child; sizes, peaks and their ratios."""
    with tempfile.TemporaryDirectory(prefix="moecompress-mem-") as tmp:
        ckpt = Path(tmp) / "model"
        ckpt.mkdir()
        # Every heavy step runs in a fresh child, which reports its own peak (VmHWM).
        build = (f"from pathlib import Path; from benchmarks.memory.calibrate_peak import build_checkpoint; "
                 f"print(build_checkpoint(Path({str(ckpt)!r}), {layers}, {hidden}, {experts}, {width}))")
        size = int(subprocess.run([sys.executable, "-c", build], check=True, capture_output=True, text=True,
                                  cwd=REPO).stdout.split()[-1])
        started = time.perf_counter()
        peaks = child_peaks(["calibrate", str(ckpt), "--samples", str(samples), "--seq-len", "128",
                             "--dtype", "bfloat16", "-o", str(Path(tmp) / "stats")])
        elapsed = time.perf_counter() - started
        load = python_peaks(LOAD_ONLY, [str(ckpt)])
    baseline = python_peaks(IMPORT_BASELINE)
    return {
        "checkpoint_bytes": size,
        "peak_rss_bytes": peaks["rss"],
        "baseline_rss_bytes": baseline["rss"],
        "peak_over_checkpoint": peaks["rss"] / size,
        "peak_above_baseline_over_checkpoint": (peaks["rss"] - baseline["rss"]) / size,
        "peak_anon_bytes": peaks["anon"],
        "baseline_anon_bytes": baseline["anon"],
        "anon_above_baseline_over_checkpoint": (peaks["anon"] - baseline["anon"]) / size,
        "peak_file_bytes": peaks["file"],
        "baseline_file_bytes": baseline["file"],
        "file_above_baseline_over_checkpoint": (peaks["file"] - baseline["file"]) / size,
        "load_anon_bytes": load["anon"],
        "load_anon_above_baseline_over_checkpoint": (load["anon"] - baseline["anon"]) / size,
        "calibrate_seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    result = {**measure(args.layers, args.hidden, args.experts, args.width, args.samples),
              "shape": {k: v for k, v in vars(args).items() if k != "json_out"}}
    print(json.dumps(result, indent=2, default=str))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
