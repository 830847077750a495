"""Open local Hugging Face MoE checkpoints, offline, whole or one decoder layer at a time.

* `inspect_checkpoint(path)`: validate the folder (config, safetensors files, MoE architecture)
  without loading weights; every problem is a one-line `MoecompressError`.
* `load_model(path, dtype=...)`: the whole model and its adapter, in memory (the paths that
  need it; everything that can read one decoder layer at a time uses
  `moecompress.engine.reader.CheckpointReader` instead).
* `load_tokenizer(path)`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecompress.dtypes import DTYPE_ALIASES
from moecompress.errors import MoecompressError
from moecompress.models.weight_format import FLOAT_FORMAT, StoredFormat, stored_format
from moecompress.models.adapters import MoEAdapter, get_adapter, supported_model_types
from moecompress.unfinished import refuse_unfinished

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype | str] = {
    name: canonical if canonical == "auto" else getattr(torch, canonical) for name, canonical in DTYPE_ALIASES.items()
}


@dataclass
class CheckpointInfo:
    """What a checkpoint folder holds, read from its config and safetensors headers only."""

    path: Path
    config: Any
    adapter: MoEAdapter
    weight_files: list[Path]
    tensor_names: list[str]
    bytes_on_disk: int
    stored_format: StoredFormat = FLOAT_FORMAT  # plain floats, FP8 blocks or MXFP4 (`io.stored_formats`)


def parse_dtype(name: str) -> torch.dtype | str:
    """A dtype from its CLI name (auto, float32, bfloat16, float16)."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise MoecompressError(f"unknown dtype {name!r}; use one of: auto, float32, bfloat16, float16") from None


def load_config(path: str | Path) -> Any:
    """The checkpoint's transformers config, read offline, with clear errors."""
    from transformers import AutoConfig

    folder = Path(path)
    if not folder.exists():
        raise MoecompressError(f"checkpoint folder {str(folder)!r} does not exist; pass a local folder with config.json")
    if not folder.is_dir():
        raise MoecompressError(f"{str(folder)!r} is a file; pass the checkpoint folder that holds config.json")
    refuse_unfinished(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise MoecompressError(f"{str(folder)!r} has no config.json; is it a Hugging Face checkpoint folder?")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoecompressError(f"{config_file} is not valid JSON ({err}); the checkpoint is corrupt") from None
    if "model_type" not in raw:
        raise MoecompressError(f"{config_file} has no model_type; moecompress needs a transformers config")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError) as err:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if raw["model_type"] not in CONFIG_MAPPING_NAMES:  # transformers' own text is a paragraph; say it in one line
            raise MoecompressError(
                f"{config_file} has model_type {raw['model_type']!r}, which transformers {transformers.__version__} "
                f"does not know; moecompress reads these MoE model types: {', '.join(supported_model_types())}"
            ) from None
        raise MoecompressError(
            f"transformers cannot read {config_file} (model_type {raw['model_type']!r}): {str(err).splitlines()[0]}"
        ) from None


def text_config(config: Any) -> Any:
    """The language-model config inside a multimodal config, or the config itself."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def adapter_for(config: Any) -> MoEAdapter:
    """The adapter for a config, with a helpful message for dense or unknown models."""
    config = text_config(config)
    model_type = getattr(config, "model_type", None)
    try:
        return get_adapter(config)
    except MoecompressError:
        if model_type is not None and not _looks_moe(config):
            raise MoecompressError(
                f"{model_type!r} is a dense model with no routed experts; moecompress compresses Mixture-of-Experts "
                f"models (supported: {', '.join(supported_model_types())})"
            ) from None
        raise


def _looks_moe(config: Any) -> bool:
    keys = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")
    return any(getattr(config, key, None) for key in keys)


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files (single file or the shards named by the index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            raise MoecompressError(f"{index} is corrupt; re-download or re-save the checkpoint") from None
        files = [folder / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MoecompressError(f"{folder} is missing shard(s) {', '.join(missing[:3])} named in {index.name}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise MoecompressError(
            f"{folder} holds pickled weights (.bin); moecompress reads safetensors only: re-save with "
            "save_pretrained(..., safe_serialization=True)"
        )
    raise MoecompressError(f"{folder} has no model.safetensors or safetensors shards")


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Validate a checkpoint folder without loading weights: config, architecture, file headers."""
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    config = load_config(folder)
    adapter = adapter_for(config)
    files = weight_files(folder)
    names: list[str] = []
    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                names.extend(handle.keys())
        except (SafetensorError, OSError) as err:
            raise MoecompressError(f"{file} is not a readable safetensors file ({err}); the checkpoint is corrupt") from None
        total += file.stat().st_size
    fmt = readable_format(config)
    return CheckpointInfo(
        path=folder, config=config, adapter=adapter, weight_files=files, tensor_names=names, bytes_on_disk=total,
        stored_format=fmt,
    )


def readable_format(config: Any) -> StoredFormat:
    """The stored format of a checkpoint moecompress reads; a one-line error for any other.

    A folder moecompress wrote in the GPTQ format is already quantised: it is opened with
    `moecompress.load`, not compressed again.
    """
    raw = getattr(config, "quantization_config", None)
    method = (raw.get("quant_method") if isinstance(raw, dict) else getattr(raw, "quant_method", None)) or ""
    if str(method).lower() == "gptq":
        raise MoecompressError("this checkpoint is already quantised (quant_method 'gptq'); open it with "
                               "moecompress.load or GPTQModel, and compress the original checkpoint instead")
    return stored_format(config)


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
) -> tuple[torch.nn.Module, MoEAdapter]:
    """Load a local checkpoint for inference (eval mode), whole, and return (model, adapter).

    FP8 and MXFP4 checkpoints are dequantised on load (transformers' own dequantising
    configs) and cast to `dtype`.
    """
    from transformers import AutoModelForCausalLM

    info = inspect_checkpoint(path)
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, local_files_only=True)
    if info.stored_format.quantized:
        kwargs["quantization_config"] = _dequantizing_config(info.stored_format)
    try:
        model = AutoModelForCausalLM.from_pretrained(info.path, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoecompressError(f"could not load {info.path}: {first}") from None
    if info.stored_format.quantized and isinstance(torch_dtype, torch.dtype):
        _cast_parameters(model, torch_dtype)
    model.eval()
    return model, info.adapter


def _dequantizing_config(fmt: StoredFormat) -> Any:
    """transformers' own config for loading an FP8 / MXFP4 checkpoint dequantised, on any device.

    Without it transformers dequantises only when no GPU is present, and keeps FP8 modules
    (which no moecompress stage can read) on a GPU machine.
    """
    from transformers import FineGrainedFP8Config, Mxfp4Config

    not_converted = list(fmt.not_converted) or None
    if fmt.method == "fp8":
        block = fmt.block or (128, 128)
        return FineGrainedFP8Config(dequantize=True, weight_block_size=block, modules_to_not_convert=not_converted)
    return Mxfp4Config(dequantize=True, modules_to_not_convert=not_converted)


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters in `dtype` (transformers leaves dequantised FP8 weights in bf16 whatever was asked)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


# Files that hold a tokenizer's vocabulary, as transformers' tokenizer classes read them: the
# `tokenizers` JSON (every fast tokenizer), Mistral's tekken.json, SentencePiece models
# (tokenizer.model, spiece.model, ...), tiktoken ranks, WordPiece vocab.txt, and byte-level BPE's
# vocab.json with merges.txt. tokenizer_config.json and special_tokens_map.json hold settings only.
_VOCABULARY_FILES = ("tokenizer.json", "tekken.json", "vocab.txt")
_VOCABULARY_SUFFIXES = (".model", ".tiktoken")
_SAVE_HINT = "save the model's tokenizer beside it with tokenizer.save_pretrained(folder)"


def _tokenizer_files(folder: str | Path) -> list[Path]:
    """The vocabulary files of the tokenizer saved in `folder` (see `load_tokenizer`), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [f for f in folder.iterdir() if f.is_file() and (
        f.name in _VOCABULARY_FILES or f.suffix in _VOCABULARY_SUFFIXES)]
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        found += [folder / "vocab.json", folder / "merges.txt"]
    return sorted(found)


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer, offline; a one-line `MoecompressError` when the folder has none.

    The folder must hold the tokenizer's vocabulary itself: tokenizer.json, tekken.json, a
    SentencePiece or tiktoken model (`*.model`, `*.tiktoken`), vocab.txt, or vocab.json with
    merges.txt. A tokenizer_config.json alone does not count: given only a config (or no
    tokenizer files at all) transformers 5 builds an empty tokenizer of the config's class, and
    calibrating or evaluating with it would silently tokenise every text to nothing. The loaded
    tokenizer is refused as well when its vocabulary has at most one token. A vocabulary smaller
    than the config's vocab_size is allowed (padded embeddings; the cost benchmarks' random
    checkpoints carry a small tokenizer).
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if not _tokenizer_files(folder):
        raise MoecompressError(
            f"{path} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json + merges.txt, ...); "
            f"{_SAVE_HINT}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise MoecompressError(
            f"{path} has no usable tokenizer ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            f"{_SAVE_HINT}"
        ) from None
    size = len(tokenizer)
    if size <= 1:
        raise MoecompressError(f"{path}'s tokenizer is empty (its vocabulary has {size} token{'s' * (size != 1)}); "
                               f"{_SAVE_HINT}")
    return tokenizer
