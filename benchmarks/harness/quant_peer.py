"""GPTQModel as a side-by-side peer of moecompress's GPTQ: same model, calibration windows and grid.

* The peer is configured from the same `QuantPlan` moecompress builds for uniform GPTQ at b
  bits: the plan's most common spec is GPTQModel's top-level config and every other module's
  spec (4-bit attention, shared and dense MLPs; routers, embeddings and the head untouched) goes
  into its `dynamic` overrides, so both quantise the same maps to the same grids. The rest of
  the algorithm is GPTQModel's own defaults (its act-group-aware ordering, RTN fall-back below
  0.5% of the calibration tokens), except `offload_to_disk=False` (moecompress keeps the model
  in memory too).
* It runs in a child process (`gptqmodel_worker`) with `GPTQMODEL_CPU_WORKERS=2` (GPTQModel
  7.6 refuses to start its CPU pools with fewer on this machine) and the parent's torch threads.
* Its output folder is checked against the plan (every planned map packed at the planned bits
  and group count, nothing else packed) and then given the plan as `quant_plan.json`, so that
  moecompress's loader dequantises it exactly like moecompress's own checkpoints and both are
  evaluated by the same float32 forward. Optionally GPTQModel's own loader (`GPTQModel.load`,
  float16 CPU kernels) scores a few windows too, and the two loaders' agreement is recorded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from moecompress.quant.plan import PLAN_FILE, QuantPlan


def gptqmodel_missing() -> str | None:
    """Why GPTQModel cannot be run here (None when it is importable)."""
    if importlib.util.find_spec("gptqmodel") is None:
        return "gptqmodel is not installed (pip install gptqmodel==7.6.0 -c <(echo torch==2.13.0))"
    return None


def gptqmodel_config(plan: QuantPlan) -> dict[str, Any]:
    """`QuantizeConfig` keyword arguments reproducing `plan`'s per-module grids."""
    base = plan.base_spec()
    if base is None:
        raise ValueError("the plan quantises nothing")
    return {"bits": base.bits, "group_size": base.group_size, "sym": base.sym, "desc_act": base.act_order,
            "act_group_aware": base.group_aware and not base.act_order, "damp_percent": base.damp, "dynamic": plan.gptqmodel_dynamic(base), "offload_to_disk": False}


def run_worker(runs: list[dict[str, Any]], workdir: Path, threads: int, timeout: float) -> dict[str, Any]:
    """Run `runs` in one GPTQModel child process; returns its results (with an `error` if it died)."""
    job_file, results_file, log_file = workdir / "job.json", workdir / "results.json", workdir / "worker.log"
    job_file.write_text(json.dumps({"threads": threads, "results": str(results_file), "runs": runs}, indent=1))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "TORCHDYNAMO_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    error = None
    with log_file.open("w") as log:
        try:
            done = subprocess.run([sys.executable, "-m", "benchmarks.harness.gptqmodel_worker", str(job_file)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  cwd=workdir)  # GPTQModel writes its logs/ folder into the working directory
            if done.returncode != 0:
                error = f"GPTQModel worker exited with status {done.returncode}: {_last_error(log_file)}"
        except subprocess.TimeoutExpired:
            error = f"GPTQModel worker did not finish within {timeout:.0f} s"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"runs": {}}
    for run in runs:
        if run["name"] not in results["runs"]:
            results["runs"][run["name"]] = {"ok": False, "error": error or "GPTQModel worker wrote no result"}
    return results


def _last_error(log_file: Path) -> str:
    """The last exception line of a worker log."""
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("Exception")]
    return (errors or lines or ["no output"])[-1][:500]


def plan_mismatches(folder: Path, plan: QuantPlan) -> list[str]:
    """Where GPTQModel's packed tensors differ from `plan` (bits, groups, or maps packed or not)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            shapes.update({name: list(handle.get_slice(name).get_shape()) for name in handle.keys()})
    packed = {name.removesuffix(".qweight") for name in shapes if name.endswith(".qweight")}
    problems = []
    planned = {name: spec for name, spec in plan.gptq_modules().items() if spec is not None}
    for name, spec in planned.items():
        if name not in packed:
            problems.append(f"{name} is not packed")
            continue
        in_features = shapes[f"{name}.g_idx"][0]
        rows, groups = shapes[f"{name}.qweight"][0], shapes[f"{name}.scales"][0]
        if rows != math.ceil(in_features * spec.bits / 32):
            problems.append(f"{name}: {rows} packed rows for {in_features} inputs at {spec.bits} bits")
        if groups != math.ceil(in_features / spec.effective_group(in_features)):
            problems.append(f"{name}: {groups} groups for group size {spec.group_size}")
    problems += [f"{name} is packed but the plan keeps it unquantised" for name in sorted(packed - set(planned))]
    return problems


def describe_with_plan(folder: Path, plan: QuantPlan) -> None:
    """Give GPTQModel's folder the plan, so moecompress's loader can dequantise it."""
    (folder / PLAN_FILE).write_text(plan.model_dump_json(indent=2) + "\n")


def loader_agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean KL(ours || theirs) of two (B, S-1, V) log-probability tensors."""
    ours, theirs = ours.float(), theirs.float()
    kl = (ours.exp() * (ours - theirs)).sum(-1)  # (B, S-1)
    return {"top1": float((ours.argmax(-1) == theirs.argmax(-1)).double().mean()), "kl": float(kl.double().mean()),
            "tokens": int(kl.numel())}
