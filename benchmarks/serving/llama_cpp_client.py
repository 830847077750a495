"""llama.cpp as a client of the `serving` suite: an output exported by `moecompress export gguf`, run by llama-cpp-python.

Each output folder is exported at f32 (`export_gguf(..., output_type="f32")`) into the suite's
scratch folder and run by llama.cpp in this process (llama-cpp-python, float32 KV cache, every
position's logits) on the same windows vLLM sees. Its result has the worker's shape (per window:
the logprobs of the window's next tokens, the rank-1 token at each position, the greedy next
token after the window and its logprob), so `suite.compare` scores both engines the same way.
Where `export gguf` refuses the output, or llama-cpp-python is missing, the one-line reason is
the result.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.serving.records import window_record

F32 = 0  # GGML_TYPE_F32: the KV cache type


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run here (None: llama-cpp-python imports)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'moecompress[llama]')"
    return None


def _window(llm: Any, ids: list[int]) -> dict[str, Any]:
    """The record of one window: llama.cpp's logprobs at every position of `ids`."""
    llm.reset()
    llm.eval(ids)
    logits = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)  # (S, V)
    return window_record(torch.log_softmax(logits, dim=-1), ids)


def serve_llama_cpp(folder: Path, ids: torch.Tensor, workdir: Path, threads: int) -> dict[str, Any]:
    """Export `folder` to GGUF (f32) and run llama.cpp on the windows `ids` (N, S); the worker's result shape."""
    from moecompress.errors import MoecompressError
    from moecompress.export.gguf import export_gguf

    missing = llama_cpp_missing()
    if missing:
        return {"ok": False, "error": missing}
    import llama_cpp

    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "model.gguf"
    started = time.perf_counter()
    try:
        exported = export_gguf(folder, out, output_type="f32", force=True, progress=False)
    except MoecompressError as err:
        return {"ok": False, "error": f"export gguf refused it: {err}"}
    export_seconds = time.perf_counter() - started
    started = time.perf_counter()
    length = int(ids.shape[1])
    llm = llama_cpp.Llama(str(out), n_ctx=length, n_batch=length, n_ubatch=length, logits_all=True,
                          n_threads=threads, type_k=F32, type_v=F32, verbose=False)
    try:
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        windows = [_window(llm, row.tolist()) for row in ids]
    finally:
        llm.close()
    return {"ok": True, "windows": windows, "arch": exported.arch, "gguf_bytes": exported.bytes,
            "export_seconds": export_seconds, "load_seconds": load_seconds,
            "run_seconds": time.perf_counter() - started}
