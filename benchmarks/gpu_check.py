"""The GPU check: the same moecompress commands with --device cuda give the CPU results.

Run on a machine with a CUDA device (a session lent one runs it once and records the output):

    python -m benchmarks.gpu_check [--layers 4] [--json-out gpu_check.json]

It builds a small random Qwen3-MoE checkpoint in bfloat16 (no download), then for each device
(cpu, cuda) runs `calibrate` through the layer engine and times it, and `prune --method
frequency` from the same statistics. Checks, each printed with its measured value:

* every statistic on cuda equals the cpu one within `--rtol` (float64 accumulators; the layer
  arithmetic differs between devices, so bit equality is not expected);
* the prune plans (kept experts per layer) are identical;
* the batched GPTQ solve (`moecompress.quant.gptq.gptq_batched`) of the same weights and
  Hessians on cuda matches the cpu one: the share of differing codes is at most `--code-diff`
  (float rounding moves a few values across a rounding boundary) and the GPTQ losses agree
  within `--rtol`, with the seconds each device took;
* `quantize --bits 3 --device cuda` (MC-MoE sensitivity, GPTQ through the layer engine) chooses the
  same bits per expert as on cpu, and its output, reopened with `moecompress.load`, gives the cpu
  output's logits within `--rtol` (of the largest logit), with the seconds each device took;
* `export gguf --bits 5.5 --device cuda` (Fisher-weighted type errors from the layer-streamed
  backward pass) chooses the same GGML type for every tensor as on cpu, and every tensor's errors
  agree within `--rtol` (of that tensor's largest), with the seconds each device took;
* with two or more GPUs, `torchrun --nproc-per-node 2 -m moecompress quantize --bits 3 --device cuda`
  (NCCL, data-parallel passes, expert-parallel solves) chooses the single-GPU run's bits per
  expert and gives its logits within `--rtol`, with the seconds it took (a machine with one GPU
  reports the check as not run);
* seconds per decoder layer on each device.

Exit status 1 when a check fails; 2 when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def build_checkpoint(folder: Path, layers: int) -> None:
    """A random bf16 Qwen3-MoE (hidden 512, 32 experts, top-4, renormalised as Qwen3-30B-A3B) with a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from tests.tiny_tokenizer import save_tokenizer

    tokenizer = save_tokenizer(folder, vocab_size=300)
    config = Qwen3MoeConfig(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                            num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                            num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, vocab_size=len(tokenizer),
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)


def run_device(checkpoint: Path, device: str, layers: int) -> dict:
    """Calibrate and plan a frequency prune on `device`; statistics, plan and seconds per layer."""
    from moecompress.calibration.calibrate import calibrate
    from moecompress.calibration.request import CalibrationRequest
    from moecompress.prune.run import prune_checkpoint
    from moecompress.prune.request import PruneRequest

    start = time.perf_counter()
    stats = calibrate(checkpoint, CalibrationRequest(samples=8, seq_len=128, device=device), progress=False)
    seconds = time.perf_counter() - start
    result = prune_checkpoint(checkpoint, None, PruneRequest(method="frequency", ratio=0.5, device=device),
                              stats=stats, dry_run=True, progress=False)
    return {"stats": stats, "keep": result.plan.keep, "seconds": seconds, "seconds_per_layer": seconds / layers}


def gptq_on_devices(experts: int = 16, rows: int = 768, columns: int = 2048) -> dict:
    """The same batched GPTQ solve on cpu and cuda (Qwen3-30B-A3B's gate shape): codes, losses, seconds."""
    import torch

    from moecompress.quant.gptq import gptq_batched
    from moecompress.quant.spec import QuantSpec

    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(experts, rows, columns, generator=generator) * 0.02
    inputs = torch.randn(experts, 512, columns, generator=generator)
    hessians = torch.einsum("nti,ntj->nij", inputs, inputs) / 512
    spec = QuantSpec(bits=3, group_size=128)
    out = {}
    for device in ("cpu", "cuda"):
        start = time.perf_counter()
        results = gptq_batched(weights.to(device), hessians.to(device), spec)
        if device == "cuda":
            torch.cuda.synchronize()
        out[device] = {"seconds": time.perf_counter() - start,
                       "codes": torch.stack([r.weight.codes.cpu() for r in results]),
                       "loss": sum(r.loss for r in results)}
    return out


def quantize_on_devices(checkpoint: Path, folder: Path, devices: tuple[str, ...] = ("cpu", "cuda")) -> dict:
    """`quantize --bits 3` (MC-MoE, GPTQ) of the same checkpoint on cpu and cuda: seconds, plans, logits."""
    import torch

    from moecompress.quant.load import load_quantized
    from moecompress.quant.run import parse_request, quantize_checkpoint

    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    out = {}
    for device in devices:
        start = time.perf_counter()
        result = quantize_checkpoint(checkpoint, folder / device, parse_request(bits=3, samples=8, seq_len=128,
                                                                                  device=device), progress=False)
        seconds = time.perf_counter() - start
        model, _ = load_quantized(folder / device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        out[device] = {"seconds": seconds, "bits": result.plan.expert_bits(), "logits": logits}
    return out


def gguf_mix_on_devices(checkpoint: Path, folder: Path, devices: tuple[str, ...] = ("cpu", "cuda")) -> dict:
    """`export gguf --bits 5.5` (Fisher sensitivity) of the same checkpoint on each device: seconds, types, errors."""
    from moecompress.export.gguf import export_gguf
    from moecompress.export.gguf_budget import GGUFBudget
    from moecompress.export.gguf_mix import MixOptions

    out = {}
    for device in devices:
        mix = MixOptions(budget=GGUFBudget(bits=5.5), samples=4, seq_len=128, device=device)
        start = time.perf_counter()
        result = export_gguf(checkpoint, folder / f"mix-{device}.gguf", progress=False, mix=mix)
        out[device] = {"seconds": time.perf_counter() - start, "errors": mix.errors,
                       "types": {name: qtype.name for name, qtype in result.allocation.types.items()}}
    return out


def worst_error_gap(reference: dict, other: dict) -> float:
    """Largest |difference| of two type-error tables, relative to each tensor's largest error."""
    worst = 0.0
    for name, per_type in reference.items():
        scale = max(abs(value) for value in per_type.values()) or 1.0
        worst = max(worst, max(abs(other[name][t] - value) for t, value in per_type.items()) / scale)
    return worst


def torchrun_quantize(checkpoint: Path, folder: Path, ranks: int = 2) -> dict:
    """`quantize --bits 3 --device cuda` under torchrun with `ranks` GPUs: seconds, bits per expert, logits."""
    import os
    import socket
    import subprocess

    import torch

    from moecompress.io.manifest import read_manifest
    from moecompress.quant.load import load_quantized

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = folder / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "moecompress", "quantize", str(checkpoint), "--bits",
               "3", "--samples", "8", "--seq-len", "128", "--device", "cuda", "-o", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"seconds": seconds, "error": done.stderr[-3000:]}
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    model, _ = load_quantized(out)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return {"seconds": seconds, "bits": read_manifest(out)["expert_bits"], "logits": logits}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rtol", type=float, default=2e-2)
    parser.add_argument("--code-diff", type=float, default=1e-2, help="largest share of GPTQ codes that may differ")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device on this machine: nothing to check")
        return 2
    report: dict = {"device_name": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model"
        build_checkpoint(checkpoint, args.layers)
        cpu = run_device(checkpoint, "cpu", args.layers)
        cuda = run_device(checkpoint, "cuda", args.layers)
        quantised = quantize_on_devices(checkpoint, Path(tmp))
        mixes = gguf_mix_on_devices(checkpoint, Path(tmp))
        ranks = torchrun_quantize(checkpoint, Path(tmp)) if torch.cuda.device_count() >= 2 else None
    worst = 0.0
    for key, value in cpu["stats"].tensors.items():
        other = cuda["stats"].tensors[key]
        scale = float(value.abs().max()) or 1.0
        worst = max(worst, float((other - value).abs().max()) / scale)
    report["checks"]["statistics max relative difference"] = {"value": worst, "ok": worst <= args.rtol}
    same_plan = cpu["keep"] == cuda["keep"]
    report["checks"]["identical prune plan"] = {"value": same_plan, "ok": same_plan}
    report["seconds_per_layer"] = {"cpu": cpu["seconds_per_layer"], "cuda": cuda["seconds_per_layer"]}
    solves = gptq_on_devices()
    differing = float((solves["cpu"]["codes"] != solves["cuda"]["codes"]).float().mean())
    loss_gap = abs(solves["cuda"]["loss"] - solves["cpu"]["loss"]) / max(abs(solves["cpu"]["loss"]), 1e-30)
    report["checks"]["GPTQ codes differing on cuda"] = {"value": differing, "ok": differing <= args.code_diff}
    report["checks"]["GPTQ loss relative difference"] = {"value": loss_gap, "ok": loss_gap <= args.rtol}
    report["gptq_seconds"] = {device: solves[device]["seconds"] for device in ("cpu", "cuda")}
    same_bits = quantised["cpu"]["bits"] == quantised["cuda"]["bits"]
    scale = float(quantised["cpu"]["logits"].abs().max()) or 1.0
    logit_gap = float((quantised["cuda"]["logits"] - quantised["cpu"]["logits"]).abs().max()) / scale
    report["checks"]["quantize --device cuda: same bits per expert"] = {"value": same_bits, "ok": same_bits}
    report["checks"]["quantize --device cuda: logits max relative difference"] = {
        "value": logit_gap, "ok": logit_gap <= args.rtol}
    report["quantize_seconds"] = {device: quantised[device]["seconds"] for device in ("cpu", "cuda")}
    same_types = mixes["cpu"]["types"] == mixes["cuda"]["types"]
    error_gap = worst_error_gap(mixes["cpu"]["errors"], mixes["cuda"]["errors"])
    report["checks"]["export gguf --device cuda: same type per tensor"] = {"value": same_types, "ok": same_types}
    report["checks"]["export gguf --device cuda: type errors max relative difference"] = {
        "value": error_gap, "ok": error_gap <= args.rtol}
    report["gguf_mix_seconds"] = {device: mixes[device]["seconds"] for device in ("cpu", "cuda")}
    if ranks is None:
        report["torchrun"] = "not run: this machine has one GPU (the check needs two)"
    elif "error" in ranks:
        report["checks"]["torchrun quantize on 2 GPUs ran"] = {"value": ranks["error"], "ok": False}
    else:
        single = quantised["cuda"]
        same = ranks["bits"] == {str(k): v for k, v in single["bits"].items()}  # the manifest keys layers as text
        gap = float((ranks["logits"] - single["logits"]).abs().max()) / (float(single["logits"].abs().max()) or 1.0)
        report["checks"]["torchrun quantize on 2 GPUs: same bits per expert"] = {"value": same, "ok": same}
        report["checks"]["torchrun quantize on 2 GPUs: logits max relative difference"] = {
            "value": gap, "ok": gap <= args.rtol}
        report["torchrun_quantize_seconds"] = {"2 GPUs": ranks["seconds"], "1 GPU": single["seconds"]}
    print(json.dumps(report, indent=2))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(check["ok"] for check in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
