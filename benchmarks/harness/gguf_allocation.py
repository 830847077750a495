"""Suite ``gguf-allocation``: allocated GGUF types (`export gguf --size`) against fixed mixes, run by llama.cpp.

Per fixture:

1. `export gguf --type f32` writes the unquantised GGUF (our writer);
2. llama.cpp's own quantiser (`llama_cpp.llama_model_quantize`, llama-cpp-python) turns it into
   uniform Q4_0, Q5_0 and Q8_0 files and its fixed mixes Q2_K, Q3_K_M and Q4_K_M; the types it
   actually stored are read back (`gguf.GGUFReader`): K-quants need rows that are multiples of 256,
   the fixtures' rows are 128 or 64 wide, so llama.cpp falls back to other types for them;
3. for every such baseline and every sensitivity measure (`--sensitivity output | fisher`),
   `export gguf --size <its bytes>` writes our allocated mix at the same file size (the
   calibration errors measured once per fixture and measure, on the validation split, and
   reused for every budget); where the baseline is smaller than every mix can be (all allocated
   tensors Q4_0, the head Q8_0, our header with its manifest), the smallest of a few slightly
   larger sizes (+0.1% ... +2%) that fits, recorded as `mix_slack`;
4. llama.cpp (float32 KV cache, the harness's thread count) runs every file on the first
   `windows` test windows per domain, and each next-token distribution is compared with
   transformers' float32 unquantised model:

       KL = mean_t sum_v p(v | x_<=t) (log p(v | x_<=t) - log q(v | x_<=t))    (nats/token)
       top-1 = mean_t [argmax p = argmax q]

   p: transformers (float32, the checkpoint), q: llama.cpp on the GGUF file; positions t = 1..S-1
   of every window, as `quant_agreement.score` counts them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.harness.context import Fixture
from benchmarks.harness.quant_agreement import evaluation_windows
from benchmarks.harness.report import renderer
from benchmarks.harness.suites import suite

DEFAULTS: dict[str, Any] = {
    "windows": 16,  # test windows per domain (of the protocol's seq_len)
    "baselines": ["Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_M"],
    "samples": 32,  # calibration windows per domain (validation split)
    "sensitivities": ["output", "fisher"],  # `export gguf --sensitivity` measures, each allocating its own mix
}
F32_KV = 0  # GGML_TYPE_F32
SLACKS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02)  # relative extra size tried when a baseline is below every mix


def _llama_quantize(source: Path, out: Path, ftype: str, threads: int) -> None:
    """llama.cpp's own quantiser: `source` (f32 GGUF) to `out` with file type `ftype` (e.g. Q3_K_M)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed ({code})")


def file_types(path: Path) -> dict[str, Any]:
    """Tensors per stored type and the bits per weight over the matrices not kept f32 (norms, routers)."""
    from gguf import GGUFReader

    from moecompress.io.gguf.types import KEEP_F32

    counts: dict[str, int] = {}
    params = bits = 0
    for tensor in GGUFReader(path).tensors:
        name = tensor.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
        base = tensor.name.split(".")[-2]
        if len(tensor.shape) > 1 and base not in KEEP_F32:
            params += int(tensor.n_elements)
            bits += 8 * int(tensor.n_bytes)
    return {"counts": dict(sorted(counts.items())), "bits_per_weight": bits / max(params, 1)}


class Reference:
    """transformers' float32 next-token log-probabilities on the test windows, (S-1, V) float16 per window."""

    def __init__(self, folder: Path, windows: list[torch.Tensor]) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.windows = windows
        self.log_probs = []
        with torch.no_grad():
            for ids in windows:
                logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()  # (S-1, V)
                self.log_probs.append(torch.log_softmax(logits, -1).half())
        del model


def llama_score(path: Path, reference: Reference, threads: int) -> dict[str, float]:
    """KL and top-1 of llama.cpp's next-token distributions on `path` against the reference."""
    import llama_cpp

    seq = int(reference.windows[0].numel())
    llm = llama_cpp.Llama(str(path), n_ctx=seq, n_batch=seq, n_ubatch=seq, logits_all=True, n_threads=threads,
                          type_k=F32_KV, type_v=F32_KV, verbose=False)
    kl = agree = 0.0
    tokens = 0
    try:
        for ids, logp in zip(reference.windows, reference.log_probs):
            llm.reset()
            llm.eval(ids.tolist())
            scores = torch.from_numpy(np.array(llm.scores[: seq - 1], dtype=np.float32))  # (S-1, V)
            logq = torch.log_softmax(scores, -1)
            p = logp.float()
            kl += float((p.exp() * (p - logq)).sum(-1).double().sum())
            agree += float((p.argmax(-1) == logq.argmax(-1)).double().sum())
            tokens += seq - 1
    finally:
        llm.close()
    return {"kl": kl / tokens, "top1": agree / tokens, "positions": tokens}


def fixture_rows(fixture: Fixture, settings: dict[str, Any], threads: int) -> dict[str, Any]:
    """Every baseline and its same-size allocated mix on one fixture (module docstring)."""
    from moecompress.export.gguf import export_gguf

    windows = [row for rows in evaluation_windows(fixture).values() for row in rows[: settings["windows"]]]
    reference = Reference(fixture.folder, windows)
    rows = []
    errors: dict[str, Any] = {}  # sensitivity -> the errors measured for the first budget, reused for the others
    with tempfile.TemporaryDirectory(prefix="moecompress-gguf-alloc-") as tmp:
        f32 = Path(tmp) / "f32.gguf"
        export_gguf(fixture.folder, f32, output_type="f32", progress=False)
        for name in settings["baselines"]:
            base = Path(tmp) / f"{name}.gguf"
            _llama_quantize(f32, base, name, threads)
            size = base.stat().st_size
            row: dict[str, Any] = {"baseline": name, "baseline_bytes": size, "baseline_types": file_types(base),
                                   "baseline_score": llama_score(base, reference, threads)}
            base.unlink()
            row["mixes"] = {}
            for sensitivity in settings["sensitivities"]:
                row["mixes"][sensitivity], errors[sensitivity] = _mix_row(
                    fixture, settings, size, Path(tmp) / f"mix-{name}-{sensitivity}.gguf", sensitivity,
                    errors.get(sensitivity), reference, threads)
            rows.append(row)
    return {"fixture": fixture.name, "positions": len(windows) * (int(windows[0].numel()) - 1), "rows": rows}


def _mix_row(fixture: Fixture, settings: dict[str, Any], size: int, mixed: Path, sensitivity: str, errors: Any,
             reference: Reference, threads: int) -> tuple[dict[str, Any], Any]:
    """Our mix at `size` bytes (or the smallest slack that fits) with one sensitivity measure, scored by llama.cpp."""
    from moecompress.errors import MoecompressError
    from moecompress.export.gguf import export_gguf
    from moecompress.export.gguf_budget import GGUFBudget
    from moecompress.export.gguf_mix import MixOptions
    from moecompress.quant.budget import SizeBudget

    row: dict[str, Any] = {}
    result = None
    for slack in SLACKS:  # below the narrowest mix: the smallest of these slightly larger sizes that fits
        mix = MixOptions(budget=GGUFBudget(size=SizeBudget(bytes=int(size * (1 + slack)))),
                         sources=fixture.calibration_sources(), samples=settings["samples"],
                         seq_len=fixture.protocol.seq_len, errors=errors, sensitivity=sensitivity)
        try:
            result = export_gguf(fixture.folder, mixed, progress=False, mix=mix)
            row["mix_slack"] = slack
            break
        except MoecompressError as err:
            row["mix_error"] = str(err)
        finally:
            errors = mix.errors if mix.errors is not None else errors
    if result is None:
        return row, errors
    row.pop("mix_error", None)
    alloc = result.allocation
    row.update({"mix_bytes": result.bytes, "mix_types": file_types(mixed),
                "mix_allocated_bits": alloc.allocated_bits_per_weight,
                "mix_status": alloc.status, "mix_score": llama_score(mixed, reference, threads),
                "mix_choice": {k: v.name for k, v in alloc.types.items() if v.name != "F32"}})
    mixed.unlink()
    return row, errors


@suite("gguf-allocation", "Allocated GGUF types against llama.cpp's uniform types and fixed mixes at equal size")
def gguf_allocation(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """One block of rows per fixture; options override `DEFAULTS`."""
    import importlib.metadata

    settings = {**DEFAULTS, **options}
    threads = torch.get_num_threads()
    data = [fixture_rows(fixture, settings, threads) for fixture in tqdm(fixtures, desc="gguf-allocation",
                                                                          unit="fixture")]
    from moecompress.export.gguf_budget import CANDIDATES

    return {"fixtures": data, "settings": settings, "threads": threads, "candidates": [t.name for t in CANDIDATES],
            "llama_cpp_python": importlib.metadata.version("llama_cpp_python")}


def _types(entry: dict[str, Any]) -> str:
    return ", ".join(f"{count} {name}" for name, count in entry["counts"].items())


@renderer("gguf-allocation")
def render_gguf_allocation(data: dict[str, Any]) -> list[str]:
    """One table over fixtures x baselines x sensitivity measures, then the verdicts."""
    settings = data["settings"]
    lines = [
        f"llama.cpp (llama-cpp-python {data['llama_cpp_python']}, {data['threads']} thread(s), float32 KV cache) "
        f"against transformers' float32 unquantised model on the first {settings['windows']} test windows per domain: "
        "KL (nats/token) of llama.cpp's next-token distribution from transformers', and top-1 agreement. Baselines: "
        "llama.cpp's own quantiser (`llama_model_quantize`) on our f32 GGUF; the fixtures' 128/64-wide rows make it "
        "fall back from K-quants to other types (the stored types are listed). Mix: `export gguf --size <the "
        "baseline's bytes> --sensitivity S` (types from " + ", ".join(data.get("candidates", [])) + " by calibration "
        f"error on {settings['samples']} validation windows per domain; output head Q8_0; S = output: each tensor's "
        "output error, fisher: weighted by the loss's squared gradient at its outputs), at the baseline's size or, "
        "where that is below every mix, the smallest of +0.1/0.2/0.5/1/2% that fits. bpw: bits per weight over the "
        "matrices not kept f32, block scales counted.",
        "",
        "| fixture | baseline | its types | MB | bpw | KL | top-1 | sensitivity | mix MB | mix bpw | mix KL "
        "| mix top-1 | mix / baseline KL |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for fx in data["fixtures"]:
        for row in fx["rows"]:
            b = row["baseline_score"]
            head = (f"| {fx['fixture']} | {row['baseline']} | {_types(row['baseline_types'])} | "
                    f"{row['baseline_bytes'] / 1e6:.3f} | {row['baseline_types']['bits_per_weight']:.2f} | "
                    f"{b['kl']:.5f} | {b['top1']:.4f} |")
            for sensitivity, mix in row["mixes"].items():
                if "mix_error" in mix:
                    lines.append(head + f" {sensitivity} | not written: {mix['mix_error']} | | | | |")
                    verdicts.append(f"- {fx['fixture']} vs {row['baseline']} ({sensitivity}): no mix at this size")
                    continue
                m = mix["mix_score"]
                ratio = m["kl"] / max(b["kl"], 1e-30)
                lines.append(head + f" {sensitivity} | {mix['mix_bytes'] / 1e6:.3f} | "
                             f"{mix['mix_types']['bits_per_weight']:.2f} | {m['kl']:.5f} | {m['top1']:.4f} | "
                             f"{ratio:.2f} |")
                extra = (f" (the baseline is below every mix: written {mix['mix_slack']:.1%} larger)"
                         if mix.get("mix_slack") else "")
                verdicts.append(f"- {fx['fixture']} vs {row['baseline']} ({sensitivity}): mix KL {ratio:.2f}x the "
                                f"baseline's ({'lower' if ratio < 1 else 'NOT lower'}), mix {mix['mix_bytes']:,} "
                                f"bytes vs {row['baseline_bytes']:,}{extra}")
    lines += ["", "Verdicts (mix against the same-size baseline):", ""] + verdicts
    lines += ["", "Mix types per fixture (at the Q4_0 size, tensors not F32):", ""]
    for fx in data["fixtures"]:
        row = next((r for r in fx["rows"] if r["baseline"] == "Q4_0"), None)
        for sensitivity, mix in (row or {}).get("mixes", {}).items():
            if "mix_types" in mix:
                lines.append(f"- {fx['fixture']} ({sensitivity}): {_types(mix['mix_types'])}")
    return lines
