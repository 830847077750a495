"""Output types of `export gguf` (`--type`) and the GGML type each tensor is stored in.

`f32`, `f16`, `bf16` and `q8_0` are what the `gguf` package encodes in Python. Whatever the
type asked for, one-dimensional tensors (norms, biases) and the router's logit weights stay
float32 (they are tiny, and the router decides which experts run), as llama.cpp's own
converter does; a matrix whose rows are not a whole number of quantisation blocks (32 values
for Q8_0) is stored as f16 instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants

from moecompress.errors import MoecompressError

OUTPUT_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
}

FILE_TYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}

# stored dtype of the checkpoint (torch name) -> the default output type
DEFAULT_FOR_DTYPE: dict[str, str] = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}

# GGUF tensor base names kept in float32 whatever the output type (router logits, score biases)
KEEP_F32: tuple[str, ...] = ("ffn_gate_inp", "exp_probs_b")


def parse_output_type(name: str, stored_dtype: str) -> str:
    """The output type for a `--type` value; `auto` follows the checkpoint's stored dtype (else bf16)."""
    lowered = name.lower()
    if lowered == "auto":
        return DEFAULT_FOR_DTYPE.get(stored_dtype, "bf16")
    if lowered not in OUTPUT_TYPES:
        raise MoecompressError(f"unknown GGUF type {name!r}; use one of: auto, {', '.join(OUTPUT_TYPES)}")
    return lowered


def tensor_type(gguf_name: str, shape: Sequence[int], output_type: str) -> GGMLQuantizationType:
    """The GGML type tensor `gguf_name` of numpy shape `shape` is stored in for `output_type`."""
    base = gguf_name.split(".")[-2] if gguf_name.count(".") >= 1 else gguf_name
    if len(shape) == 1 or base in KEEP_F32:
        return GGMLQuantizationType.F32
    wanted = OUTPUT_TYPES[output_type]
    block, _ = GGML_QUANT_SIZES[wanted]
    if shape[-1] % block != 0:
        return GGMLQuantizationType.F16
    return wanted


def byte_shape(shape: Sequence[int], qtype: GGMLQuantizationType) -> tuple[int, ...]:
    """Numpy shape of the uint8 array that holds a tensor of `shape` encoded as `qtype`."""
    return quants.quant_shape_to_byte_shape(tuple(shape), qtype)


def encode(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`array` (float32) encoded as `qtype`, as the uint8 bytes GGUF stores (row-major, numpy shape)."""
    data = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        return data.view(np.uint8)
    if qtype == GGMLQuantizationType.F16:
        return data.astype(np.float16).view(np.uint8)
    return np.ascontiguousarray(quants.quantize(data, qtype)).view(np.uint8)


CHUNK_ELEMENTS = 1 << 22  # values widened to float32 and encoded at a time (16 MiB of float32)


def encode_tensor(tensor: torch.Tensor, qtype: GGMLQuantizationType, chunk: int = CHUNK_ELEMENTS) -> np.ndarray:
    """A tensor (any float dtype) encoded as `qtype`, a slab of its outermost axis at a time.

    GGUF stores tensors row-major, outermost axis first, so encoding slabs along axis 0 and
    placing them one after another gives the same bytes as encoding the whole tensor, while the
    float32 copy and the quantiser's temporaries stay one slab large (a stacked (E, I, H) expert
    tensor is widened an expert or a few at a time, not whole).
    """
    shape = tuple(int(d) for d in tensor.shape)
    out = np.empty(byte_shape(shape, qtype), dtype=np.uint8)
    if tensor.dim() < 2:
        out[...] = encode(tensor.detach().to(torch.float32).numpy(), qtype).reshape(out.shape)
        return out
    per_row = max(1, tensor[0].numel())
    step = max(1, chunk // per_row)
    for start in range(0, shape[0], step):
        part = tensor[start: start + step].detach().to(torch.float32).contiguous().numpy()
        out[start: start + step] = encode(part, qtype).reshape(out[start: start + step].shape)
    return out


def decode(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The float32 values of a tensor read back from a GGUF file (what llama.cpp computes with)."""
    return np.asarray(quants.dequantize(raw, qtype), dtype=np.float32)
