"""Child process of the `serving` suite, run by the python of vLLM's own venv: serve one checkpoint.

    ~/.cache/moecompress/vllm-venv/bin/python benchmarks/serving/worker.py JOB.json

JOB.json holds {"model": folder, "windows": [[token ids], ...], "max_model_len", "result": path,
"dtype" (default float32), "engine": {extra `vllm.LLM` keyword arguments}}. The worker builds one
`vllm.LLM` in this process (eager, in-process engine: `VLLM_ENABLE_V1_MULTIPROCESSING=0`), feeds every window as
token ids with greedy sampling of one token and prompt logprobs, and writes per window: the
logprob vLLM gives each prompt token (positions 1..S-1), vLLM's own top-1 token at every
position, and the greedily generated next token with its logprob. Any failure (the engine
refusing the checkpoint included) is written as the exception's type and message, and the
exit status is 1. It imports nothing from moecompress: only vLLM and the standard library.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _entries(position: Any) -> dict[int, Any]:
    """A position's {token id: Logprob} (vLLM may return a mapping or a flat container)."""
    return dict(position.items()) if hasattr(position, "items") else dict(position)


def serve(job: dict[str, Any]) -> dict[str, Any]:
    """Serve `job["model"]` with vLLM and score `job["windows"]`; returns the per-window record."""
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), max_model_len=job["max_model_len"],
              enforce_eager=True, seed=0, **job.get("engine", {}))
    load_seconds = time.perf_counter() - started
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, logprobs=1, detokenize=False)
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["windows"]], params, use_tqdm=False)
    run_seconds = time.perf_counter() - started
    windows = []
    for ids, output in zip(job["windows"], outputs):
        chosen, top1 = [], []
        for token, position in zip(ids[1:], list(output.prompt_logprobs)[1:]):
            entries = _entries(position)
            chosen.append(float(entries[token].logprob))
            top1.append(int(next(t for t, lp in entries.items() if lp.rank == 1)))
        sample = output.outputs[0]
        generated = int(sample.token_ids[0])
        windows.append({"chosen_logprobs": chosen, "top1": top1, "generated": generated,
                        "generated_logprob": float(_entries(sample.logprobs[0])[generated].logprob)})
    config = llm.llm_engine.vllm_config
    return {"ok": True, "vllm": vllm.__version__, "dtype": str(config.model_config.dtype).removeprefix("torch."),
            "load_seconds": round(load_seconds, 2), "run_seconds": round(run_seconds, 2), "quantization": config.model_config.quantization,
            "architecture": list(config.model_config.architectures or []), "windows": windows}


def one_line(err: BaseException) -> str:
    """The exception as one line: its type and its message's lines joined (800 characters at most)."""
    errors = getattr(err, "errors", None)
    if callable(errors):  # pydantic's ValidationError: its first error's own message, not the count line
        try:
            return f"{type(err).__name__}: {errors()[0]['msg']}"[:800]
        except (TypeError, IndexError, KeyError):
            pass
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # e.g. a kernel list's reasons
    return f"{type(err).__name__}: {text}"[:800]


def main(job_file: str) -> int:
    """Run the job of `job_file`, write its result JSON; 0 when vLLM served it, 1 when it refused or failed."""
    job = json.loads(Path(job_file).read_text())
    try:
        result = serve(job)
    except BaseException as err:  # noqa: BLE001 - the suite records exactly why vLLM did not serve the checkpoint
        traceback.print_exc()
        result = {"ok": False, "error": one_line(err)}
    Path(job["result"]).write_text(json.dumps(result) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
