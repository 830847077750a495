"""Child process of the quantisation suite: quantise with GPTQModel, time it, save, optionally reload.

    python -m benchmarks.harness.gptqmodel_worker JOB.json

It runs in its own process because GPTQModel patches transformers' MoE classes globally when it
loads a model. JOB.json holds {"threads", "results", "runs": [...]}; each run names the source
checkpoint, the output folder, the `QuantizeConfig` keyword arguments, a `.pt` file of (N, S)
calibration token ids, the batch size and dtype, and optionally a `.pt` file of check ids whose
log-probabilities (from `GPTQModel.load` of the saved folder, its own CPU kernels) are written to
`check_out`. Timings per run: wall clock and process CPU time (all threads) of loading,
quantising and saving; the import of gptqmodel is timed once. A failing run records its error
and the next run goes on.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def run_one(run: dict[str, Any]) -> dict[str, Any]:
    """Quantise one model per `run`; returns its timings (seconds) or its error."""
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    ids = torch.load(run["calibration"])  # (N, S)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    dtype = getattr(torch, run["dtype"])
    config = QuantizeConfig(**run["config"])
    model, load_s, load_cpu = _timed(lambda: GPTQModel.load(run["source"], config, device="cpu", dtype=dtype))
    _, quant_s, quant_cpu = _timed(lambda: model.quantize(calibration, batch_size=run["batch_size"]))
    _, save_s, save_cpu = _timed(lambda: model.save(run["output"]))
    record = {"load_seconds": load_s, "quantize_seconds": quant_s, "quantize_cpu_seconds": quant_cpu,
              "save_seconds": save_s, "seconds": load_s + quant_s + save_s,
              "cpu_seconds": load_cpu + quant_cpu + save_cpu}
    del model
    if run.get("check_ids"):
        check = torch.load(run["check_ids"])  # (B, S)
        loaded = GPTQModel.load(run["output"], device="cpu", dtype=torch.float16, backend="gptq_torch").model
        with torch.no_grad():
            logits = loaded(input_ids=check).logits[:, :-1].float()  # (B, S-1, V)
        torch.save(torch.log_softmax(logits, dim=-1), run["check_out"])
    return record


def main(job_file: str) -> None:
    """Run every job of `job_file` and write the results JSON."""
    job = json.loads(Path(job_file).read_text())
    import torch

    torch.set_num_threads(job["threads"])
    started = time.perf_counter()
    import torch._dynamo

    torch._dynamo.config.disable = True  # GPTQModel compiles kernels on first use: slow on CPU, no gain here
    import gptqmodel

    results: dict[str, Any] = {"import_seconds": time.perf_counter() - started,
                               "version": getattr(gptqmodel, "__version__", None), "runs": {}}
    for run in job["runs"]:
        try:
            results["runs"][run["name"]] = {"ok": True, **run_one(run)}
        except Exception as err:  # noqa: BLE001 - the suite records why GPTQModel could not run
            traceback.print_exc()
            results["runs"][run["name"]] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        Path(job["results"]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
