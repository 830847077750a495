"""llama.cpp (through llama-cpp-python) runs the exported GGUF as transformers runs the checkpoint.

The embedded example (and it pruned uniformly): llama.cpp's tokenisation of the held-out eval
text equals the Hugging Face tokenizer's, and its next-token argmax agrees with transformers' at
>= 99.9% of the positions of windows of that text (float32 weights, float32 KV cache). Tiny
random DeepSeek-V3 (MLA, group-limited sigmoid routing; with and without q_lora, pruned, condensed, YaRN rope),
Mixtral and YaRN-scaled Qwen3-MoE models: the same tokens and logits within 1e-3.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from moecompress.export.gguf import export_gguf  # noqa: E402

EVAL = Path(__file__).resolve().parents[2] / "moecompress" / "example" / "eval"
WINDOW = 256  # tokens per window (the example's context is 512)
WINDOWS_PER_DOMAIN = 2
F32 = 0  # GGML_TYPE_F32, for the KV cache


def _domains() -> dict[str, list[str]]:
    return {path.stem: [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
            for path in sorted(EVAL.glob("*.jsonl"))}


def _llama(path: Path, n_ctx: int) -> Iterator[Any]:
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=2,
                          type_k=F32, type_v=F32, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def _logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)


def _hf(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def _hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _agreement(folder: Path, tmp_path: Path) -> tuple[int, int, float]:
    """(agreeing positions, positions, largest logit difference) over the eval windows."""
    out = tmp_path / "model.gguf"
    export_gguf(folder, out, output_type="f32", progress=False)
    model, tokenizer = _hf(folder)
    agree = total = 0
    largest = 0.0
    for llm in _llama(out, WINDOW):
        for domain, texts in _domains().items():
            for text in texts:  # tokenisation: every document, exactly
                want = tokenizer(text, add_special_tokens=False)["input_ids"]
                got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
                assert got == want, f"llama.cpp tokenises a {domain} document differently"
            ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
            for start in range(0, WINDOW * WINDOWS_PER_DOMAIN, WINDOW):
                window = ids[start: start + WINDOW]
                ours, theirs = _logits(llm, window), _hf_logits(model, window)
                agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
                total += len(window)
                largest = max(largest, float(np.abs(ours - theirs).max()))
    return agree, total, largest


def test_example_runs_in_llama_cpp_like_transformers(example_dir: Path, tmp_path: Path) -> None:
    agree, total, largest = _agreement(example_dir, tmp_path)
    assert total >= 1500
    assert agree / total >= 0.999, f"top-1 agreement {agree}/{total}, largest logit difference {largest:.2e}"


def test_pruned_example_runs_in_llama_cpp_like_transformers(pruned_example: Path, tmp_path: Path) -> None:
    agree, total, largest = _agreement(pruned_example, tmp_path)
    assert agree / total >= 0.999, f"top-1 agreement {agree}/{total}, largest logit difference {largest:.2e}"


@pytest.mark.parametrize("which", ["deepseek_v3", "deepseek_no_q_lora", "pruned_deepseek", "condensed_deepseek",
                                   "mixtral", "qwen3_yarn", "deepseek_yarn"])
def test_tiny_models_run_in_llama_cpp_like_transformers(which: str, tiny_dir: Any, yarn_dir: Any,
                                                        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from tests.tiny_tokenizer import sample_text

    if which in ("deepseek_v3", "mixtral"):
        folder, length = tiny_dir(which), 200
    elif which.endswith("_yarn"):  # 400 positions: past the 64 the rope was scaled from
        folder, length = yarn_dir({"qwen3_yarn": "qwen3_moe", "deepseek_yarn": "deepseek_v3"}[which]), 400
    else:
        folder, length = request.getfixturevalue(which), 200
    out = tmp_path / "model.gguf"
    export_gguf(folder, out, output_type="f32", progress=False)
    model, tokenizer = _hf(folder)
    text = sample_text()[:8000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    assert len(ids) == length
    for llm in _llama(out, 512):
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:length] == ids
        ours, theirs = _logits(llm, ids), _hf_logits(model, ids)
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.99
