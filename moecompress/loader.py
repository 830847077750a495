"""`moecompress.load(path, dtype=...)`: open any checkpoint folder moecompress writes.

Dispatch on what the folder holds:

1. `config.json` with a GPTQ `quantization_config` (quantize output): `moecompress.quant.load.load_quantized`
   (an FP8 or MXFP4 `quantization_config`, as published or as prune keeps it, is dequantised by
   `from_pretrained` below);
2. a `moecompress_layout.json` of format "moecompress-condensed" (CD-MoE layers that the
   architecture cannot express as dense layers): `moecompress.condense.apply.load_condensed`;
3. any other `moecompress_layout.json` (non-uniform expert counts or per-expert widths, see
   `moecompress.models.layout`), or a manifest whose `format` says so: moecompress's layout loader;
4. anything else (uniform pruned / condensed folders, original checkpoints): plain
   `AutoModelForCausalLM.from_pretrained`.

Afterwards, when the config's `moecompress` entry holds NAEE dynamic-skipping thresholds, the
skipping is installed on the loaded model (`moecompress.prune.dynamic_skip`). The model is
returned in eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moecompress.errors import MoecompressError

_LAYOUT_FORMAT = "moecompress-layout"


def _raw_config(folder: Path) -> dict[str, Any]:
    from moecompress.unfinished import refuse_unfinished

    config_file = folder / "config.json"
    refuse_unfinished(folder)  # a killed run's temporary folder: say so, not "no config.json"
    if not folder.exists():
        raise MoecompressError(f"{str(folder)!r} does not exist; pass a local checkpoint folder (nothing is downloaded)")
    if not folder.is_dir():
        raise MoecompressError(f"{str(folder)!r} is not a folder; pass a checkpoint folder with config.json")
    if not config_file.is_file():
        raise MoecompressError(f"{str(folder)!r} has no config.json; is it a checkpoint folder?")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoecompressError(f"{config_file} is not valid JSON ({err})") from None


def _layout_format(folder: Path) -> str | None:
    """The `format` recorded in the folder's moecompress_layout.json (None when absent or unreadable)."""
    from moecompress.models.layout import LAYOUT_FILE

    path = folder / LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("format")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def checkpoint_kind(path: str | Path) -> str:
    """What `load` will do with a folder: "gptq", "condensed", "layout" or "transformers"."""
    from moecompress.condense.apply import LAYOUT_FORMAT as CONDENSED_FORMAT
    from moecompress.io.manifest import read_manifest
    from moecompress.models.layout import LAYOUT_FILE

    folder = Path(path)
    raw = _raw_config(folder)
    method = str((raw.get("quantization_config") or {}).get("quant_method", "")).lower()
    if method == "gptq":
        return "gptq"
    if _layout_format(folder) == CONDENSED_FORMAT:
        return "condensed"
    manifest = read_manifest(folder) or {}
    if (folder / LAYOUT_FILE).is_file() or manifest.get("format") == _LAYOUT_FORMAT:
        return "layout"
    return "transformers"


def _stored_quantized(folder: Path) -> bool:
    """Whether the folder's weights are stored in FP8 blocks or MXFP4 (its quantization_config says so)."""
    method = str((_raw_config(folder).get("quantization_config") or {}).get("quant_method", "")).lower()
    return method in ("fp8", "mxfp4")


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    from moecompress.models.load import parse_dtype

    value = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if value == "auto":
        return torch.float32
    return value


def _load_gptq(folder: Path, dtype: str | torch.dtype, dequantize: str) -> torch.nn.Module:
    from moecompress.quant.load import load_quantized

    model, _ = load_quantized(folder, dtype, dequantize=dequantize)
    return model


def load(path: str | Path, dtype: str | torch.dtype = "float32", dequantize: str = "load") -> torch.nn.Module:
    """Open a checkpoint folder written by moecompress (or any supported original) in eval mode.

    dtype: "float32", "bfloat16", "float16", "auto" or a torch dtype.
    dequantize (GPTQ folders): "load" dequantises every weight once; "use" keeps the weights
    packed and dequantises a layer's linears while it runs and only the routed experts (about
    the packed size in memory plus one layer; `moecompress.quant.load`).
    """
    from transformers import AutoModelForCausalLM

    from moecompress.quant.load import check_dequantize_mode

    check_dequantize_mode(dequantize)  # also for folders that are not GPTQ, which ignore it
    folder = Path(path)
    kind = checkpoint_kind(folder)
    if kind == "gptq":
        model = _load_gptq(folder, dtype, dequantize)
    elif kind == "condensed":
        from moecompress.condense.apply import load_condensed

        model = load_condensed(folder, dtype=_dtype(dtype))
    elif kind == "layout":
        from moecompress.models.layout import load_layout_checkpoint

        model = load_layout_checkpoint(folder, dtype=_dtype(dtype))
    elif _stored_quantized(folder):  # FP8 / MXFP4 as published or as prune keeps it: dequantised on load
        from moecompress.models.load import load_model

        model, _ = load_model(folder, dtype=dtype)
    else:
        from moecompress.models.load import parse_dtype

        torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
        except (OSError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MoecompressError(f"could not load {folder}: {first}") from None
    settings = getattr(model.config, "moecompress", None) or {}
    if settings.get("dynamic_skip"):
        from moecompress.prune.dynamic_skip import install_dynamic_skip

        install_dynamic_skip(model, settings["dynamic_skip"])
    return model.eval()


def open_for_evaluation(model: str | Path, dtype: str, streaming: bool) -> tuple[torch.nn.Module, Any]:
    """(model, reader) as `moecompress eval` opens them; GPTQ and moecompress-layout folders through `moecompress.load`.

    streaming: read a stock checkpoint one decoder layer at a time (the model is then a meta
    skeleton and the reader, a `CheckpointReader`, serves its layers); a GPTQ folder stays packed
    and is dequantised at use (`load(..., dequantize="use")`). Otherwise reader is None.
    """
    from moecompress.models.load import inspect_checkpoint, load_model

    kind = checkpoint_kind(model)
    if kind == "transformers":
        info = inspect_checkpoint(model)
        if streaming:
            if not info.adapter.streaming_supported or not info.adapter.layerwise_supported:
                raise MoecompressError(f"{info.config.model_type} cannot be evaluated one layer at a time; "
                                       "evaluate it without --streaming")
            from moecompress.engine.reader import CheckpointReader

            reader = CheckpointReader(model, dtype=dtype, info=info)
            return reader.model, reader
        loaded, _ = load_model(model, dtype=dtype)
        return loaded, None
    if kind == "gptq":  # streaming: the weights stay packed, dequantised a layer (and its routed experts) at use
        return load(model, dtype=dtype, dequantize="use" if streaming else "load"), None
    if streaming:
        raise MoecompressError(f"streaming evaluation reads stock and GPTQ checkpoints only; {model} is a {kind} "
                               "checkpoint, evaluate it without streaming")
    return load(model, dtype=dtype), None
