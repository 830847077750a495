"""GPTQModel as a client of the `serving` suite: a GPTQ output opened by `GPTQModel.load` and run on the windows.

    python -m benchmarks.serving.gptqmodel_client JOB.json     (from the repository root)

GPTQModel patches transformers' MoE classes when it loads a model, so it runs in a child
process of the project's venv. The child loads the folder with GPTQModel's CPU kernels
(`device="cpu"`, float16, `backend="gptq_torch"`: its CPU kernels run in float16 or bfloat16
only), runs every window and writes one `records.window_record` per window, so `suite.compare`
scores it as it scores vLLM. A failure is its one-line error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

TIMEOUT = 900.0  # seconds per output
REPO = Path(__file__).resolve().parents[2]  # the child runs from here, so `benchmarks` imports


def gptqmodel_missing() -> str | None:
    """Why GPTQModel cannot run here (None: it is installed)."""
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is None:
        return "gptqmodel is not installed (pip install 'moecompress[gptq]')"
    return None


def serve_gptqmodel(folder: Path, ids: torch.Tensor, workdir: Path, threads: int) -> dict[str, Any]:
    """Run the GPTQ folder `folder` with GPTQModel on the windows `ids` (N, S) in a child process."""
    missing = gptqmodel_missing()
    if missing:
        return {"ok": False, "error": missing}
    workdir.mkdir(parents=True, exist_ok=True)
    job, result = workdir / "job.json", workdir / "result.json"
    result.unlink(missing_ok=True)
    torch.save(ids, workdir / "ids.pt")
    job.write_text(json.dumps({"model": str(folder), "ids": str(workdir / "ids.pt"), "result": str(result),
                               "threads": threads}))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(threads), "TORCHDYNAMO_DISABLE": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.serving.gptqmodel_client", str(job)], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"GPTQModel did not finish within {TIMEOUT:.0f} s"}
    if not result.is_file():
        errors = [line for line in done.stderr.splitlines() if re.match(r"^\w+(Error|Exception)\b", line)]
        last = (errors or [f"exit status {done.returncode}"])[-1]
        return {"ok": False, "error": f"GPTQModel child failed: {last}"}
    return json.loads(result.read_text())


def _windows(model: Any, ids: torch.Tensor) -> list[dict[str, Any]]:
    """The records of every window (N, S), from the model's float32 log-probabilities."""
    from benchmarks.serving.records import window_record

    records = []
    for row in ids:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=row[None]).logits[0].float(), dim=-1)  # (S, V)
        records.append(window_record(logprobs, row.tolist()))
    return records


def main(job_file: str) -> None:
    """The child: load with GPTQModel, run the windows, write the result (or the error) as JSON."""
    job = json.loads(Path(job_file).read_text())
    torch.set_num_threads(int(job["threads"]))
    try:
        from gptqmodel import GPTQModel

        started = time.perf_counter()
        model = GPTQModel.load(job["model"], device="cpu", dtype=torch.float16, backend="gptq_torch").model
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        windows = _windows(model, torch.load(job["ids"]))
        result = {"ok": True, "windows": windows, "dtype": "float16", "load_seconds": load_seconds,
                  "run_seconds": time.perf_counter() - started}
    except Exception as err:  # noqa: BLE001 - recorded as the client's one-line error
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0][:500]}
    Path(job["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
