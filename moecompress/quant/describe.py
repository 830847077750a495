"""What a GPTQ folder written by moecompress holds and what opens it (`moecompress inspect` on quantize output).

Read from the folder's `quant_plan.json`, `moecompress_manifest.json` and safetensors headers;
no weight is loaded. The loaders listed are the ones this project tests on such folders.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from moecompress.errors import MoecompressError
from moecompress.quant.plan import PLAN_FILE, QuantPlan

# (loader, how to call it, what it does with a moecompress GPTQ folder): what the tests establish
OPENS_WITH: tuple[tuple[str, str, str], ...] = (
    ("moecompress.load", 'moecompress.load(path)', "dense float weights at load"),
    ("moecompress.load, packed", 'moecompress.load(path, dequantize="use")',
     "weights stay packed; a layer's linears and only its routed experts dequantised at use"),
    ("moecompress eval", "moecompress eval PATH [--streaming]", "perplexity; --streaming keeps the weights packed"),
    ("GPTQModel", 'GPTQModel.load(path, device="cpu")', "its own kernels (gptqmodel==7.6.0; not GraniteMoE experts)"),
)
DOES_NOT_OPEN_WITH: tuple[tuple[str, str], ...] = (
    ("transformers from_pretrained", "fails with 'requires optimum'; with optimum, its GPTQ path loads MoE experts "
                                     "wrongly (mixed bits raise size mismatches, uniform bits re-initialise them)"),
    ("auto-gptq", "does not import with transformers 5"),
)


def describe_gptq_folder(path: str | Path) -> dict[str, Any]:
    """The plan, sizes and loaders of a GPTQ folder moecompress wrote, as a JSON-ready dict."""
    from moecompress.io.checkpoint import folder_bytes
    from moecompress.io.manifest import read_manifest

    folder = Path(path)
    plan_file = folder / PLAN_FILE
    if not plan_file.is_file():
        raise MoecompressError(f"{folder} is a GPTQ checkpoint without {PLAN_FILE}: it was not written by "
                               "moecompress; open it with GPTQModel.load")
    plan = QuantPlan.model_validate_json(plan_file.read_text())
    manifest = read_manifest(folder) or {}
    expert_bits = plan.expert_bits()  # layer -> bits per expert
    histogram = Counter(bits for widths in expert_bits.values() for bits in widths)
    linear_bits = Counter(entry.spec.bits for entry in plan.entries.values()
                          if entry.kind == "linear" and entry.spec is not None)
    return {
        "path": str(folder),
        "format": "gptq",
        "method": manifest.get("method"),
        "source": (manifest.get("source") or {}).get("path") if isinstance(manifest.get("source"), dict)
        else manifest.get("source"),
        "average_expert_bits": plan.average_expert_bits() if expert_bits else None,
        "expert_bits_histogram": {str(bits): count for bits, count in sorted(histogram.items())},
        "expert_bits_per_layer": {str(layer): widths for layer, widths in sorted(expert_bits.items())},
        "other_linears_bits_histogram": {str(bits): count for bits, count in sorted(linear_bits.items())},
        "effective_bits_per_parameter": manifest.get("effective_bits_per_parameter"),
        "bytes_on_disk": folder_bytes(folder),
        "bytes_before": manifest.get("bytes_before"),
        "opens_with": [{"loader": name, "call": call, "does": does} for name, call, does in OPENS_WITH],
        "does_not_open_with": [{"loader": name, "why": why} for name, why in DOES_NOT_OPEN_WITH],
    }
