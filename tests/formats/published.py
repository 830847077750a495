"""Tiny Hugging Face MoE checkpoints in the on-disk formats real models are published in.

Test support, deliberately independent of moecompress (nothing here imports it): each writer builds a tiny
seeded model from the transformers config class, saves it in bf16 with ``save_pretrained`` (so the keys are
exactly what transformers writes for that architecture), then rewrites the safetensors file tensor by tensor
into the published quantised layout and adds the published ``quantization_config`` to ``config.json``.

Formats:
  * FP8 block-scaled (DeepSeek-V3, Qwen3-*-FP8): every linear weight inside the decoder layers is stored as
    ``float8_e4m3fn`` under its usual ``....weight`` key, next to a float32 ``....weight_scale_inv`` of shape
    [ceil(out/b0), ceil(in/b1)] with ``weight ~= fp8.float() * scale_inv`` over each (b0, b1) block.
  * MXFP4 experts (gpt-oss): the fused expert matrices are stored as ``..._blocks`` (uint8, two e2m1 values a
    byte, low nibble first) and ``..._scales`` (uint8 e8m0 exponents, bias 127), 32 values a block along the
    input dimension.

``reference_state_dict`` is what transformers itself makes of such a folder on the CPU: the independent
reference a dequantiser is compared against.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    FineGrainedFP8Config,
    GptOssConfig,
    Mxfp4Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3MoeConfig,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

EXAMPLE_MODEL_DIR = Path(__file__).resolve().parents[2] / "moecompress" / "example" / "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

FP8_ARCHS = ("deepseek_v3", "qwen3_moe")
ARCHS = (*FP8_ARCHS, "gpt_oss")
FP8_FMT = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}

MXFP4_BLOCK = 32  # values sharing one e8m0 exponent, along the input dimension
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # nibble 0..7; bit 3 is the sign
E8M0_BIAS = 127
MXFP4_EXPERT_PARAMS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # (E, in, out) in transformers

TensorMap = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# tiny models


def _example_tokens() -> dict[str, int]:
    """Vocabulary size and special token ids of the example model's tokenizer, from its config.json."""
    config = json.loads((EXAMPLE_MODEL_DIR / "config.json").read_text())
    return {
        "vocab_size": config["vocab_size"],
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["eos_token_id"],
    }


def tiny_config(arch: str, ragged: bool = False) -> PretrainedConfig:
    """The tiny config of ``arch`` ("deepseek_v3", "qwen3_moe" or "gpt_oss"), vocabulary of the example tokenizer.

    By default every FP8-quantised matrix dimension is a multiple of 16, so the default [16, 16] blocks tile
    each matrix several times without remainder: transformers 5.23 can only dequantise such checkpoints (it
    derives the block as rows // scale_rows, which is even silently wrong where ceil(n/b) divides n: 24
    columns in 16-blocks are read as two 12-blocks). ``ragged=True`` (FP8 archs) makes the MoE and dense
    intermediate size 40 and DeepSeek's ``kv_a_proj_with_mqa`` 40 rows (kv_lora_rank 32 + qk_rope_head_dim 8),
    so edge blocks are partial, as the real DeepSeek-V3's 576-row ``kv_a_proj_with_mqa`` is in 128-blocks.
    """
    tokens = _example_tokens()
    intermediate = 40 if ragged else 48
    if arch == "deepseek_v3":
        return DeepseekV3Config(
            **tokens,
            hidden_size=64,
            intermediate_size=intermediate,  # dense MLP of layer 0
            moe_intermediate_size=intermediate,
            num_hidden_layers=3,
            first_k_dense_replace=1,  # layer 0 dense, layers 1-2 MoE
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=32,  # kv_b_proj input
            qk_rope_head_dim=8 if ragged else 16,  # kv_a_proj_with_mqa rows: 32 + 8 = 40 or 32 + 16 = 48
            qk_nope_head_dim=16,
            v_head_dim=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            max_position_embeddings=128,
        )
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            **tokens,
            hidden_size=64,
            intermediate_size=intermediate,
            moe_intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=128,
        )
    if arch == "gpt_oss":
        if ragged:
            raise ValueError("MXFP4 blocks are 32 values along the input; gpt_oss has no ragged variant")
        return GptOssConfig(
            **tokens,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=16,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraw every float parameter and buffer from a seeded generator (independent of torch's global RNG).

    Norm weights 1 +- 0.05, matrices std 0.1, other vectors (biases, correction biases, sinks) std 0.1, so
    biases and DeepSeek's correction biases are non-zero (transformers' own init leaves them at zero).
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for name, tensor in tensors:
            if not tensor.is_floating_point() or "rotary_emb" in name or "inv_freq" in name:
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            is_norm = tensor.dim() == 1 and "norm" in name.rpartition(".")[0].rpartition(".")[2]
            tensor.copy_(1.0 + 0.05 * noise if is_norm else 0.1 * noise)


def tiny_model(arch: str, seed: int = 0, ragged: bool = False) -> PreTrainedModel:
    """The bf16 model a fixture of ``arch`` starts from: same arguments, same weights, every time."""
    model = AutoModelForCausalLM.from_config(tiny_config(arch, ragged), dtype=torch.bfloat16)
    _randomize_(model, seed)
    return model.eval()


def _save_bf16(model: PreTrainedModel, folder: Path) -> Path:
    """``save_pretrained`` the model into ``folder`` and copy the example tokenizer beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(EXAMPLE_MODEL_DIR / name, folder / name)
    return folder


# --------------------------------------------------------------------------------------------------------------
# rewriting a saved folder


def _safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors shards."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return files


def _read_tensors(path: Path) -> tuple[TensorMap, dict[str, str]]:
    """All tensors of one safetensors file, and its metadata."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}


def _rewrite_safetensors(folder: Path, convert: Callable[[str, torch.Tensor], TensorMap]) -> None:
    """Replace each tensor of each shard by what ``convert(key, tensor)`` returns (one or more new entries).

    Keeps each shard's metadata and, for a sharded folder, rewrites ``model.safetensors.index.json``.
    """
    weight_map: dict[str, str] = {}
    for path in _safetensors_files(folder):
        tensors, metadata = _read_tensors(path)
        rewritten: TensorMap = {}
        for key, tensor in tensors.items():
            rewritten.update(convert(key, tensor))
        save_file({k: v.contiguous() for k, v in rewritten.items()}, str(path), metadata=metadata)
        weight_map.update(dict.fromkeys(rewritten, path.name))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2) + "\n")


def _patch_config(folder: Path, quantization_config: dict) -> None:
    """Add ``quantization_config`` to the folder's config.json."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = quantization_config
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------------------
# FP8 block-scaled


def quantize_fp8_blocks(
    weight: torch.Tensor, block: tuple[int, int], fp8_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scale ``weight`` [out, in]: (fp8 [out, in], float32 scale_inv [ceil(out/b0), ceil(in/b1)]).

    scale_inv = amax(|block|) / finfo(fp8).max (1 for an all-zero block), fp8 = weight / scale_inv rounded to
    nearest; edge blocks are partial.
    """
    b0, b1 = block
    out, inp = weight.shape
    rows, cols = math.ceil(out / b0), math.ceil(inp / b1)
    fp8_max = torch.finfo(fp8_dtype).max
    padded = torch.zeros(rows * b0, cols * b1, dtype=torch.float32)
    padded[:out, :inp] = weight.float()
    tiles = padded.view(rows, b0, cols, b1)  # [rows, b0, cols, b1]
    amax = tiles.abs().amax(dim=(1, 3))  # [rows, cols]
    scale_inv = torch.where(amax > 0, amax / fp8_max, torch.ones_like(amax))  # [rows, cols]
    scaled = (tiles / scale_inv[:, None, :, None]).clamp(-fp8_max, fp8_max)
    fp8 = scaled.to(fp8_dtype).view(rows * b0, cols * b1)[:out, :inp]  # [out, in]
    return fp8.contiguous(), scale_inv


def _is_fp8_target(key: str, tensor: torch.Tensor) -> bool:
    """Whether a saved tensor is a decoder-layer linear weight that FP8 checkpoints quantise.

    Quantised: attention projections, dense MLPs, shared and routed experts (2-D ``model.layers.*.weight``).
    Kept: embeddings, lm_head, norms (1-D), the router ``mlp.gate.weight``, correction biases, biases.
    """
    return (
        key.startswith("model.layers.")
        and key.endswith(".weight")
        and tensor.dim() == 2
        and not key.endswith(".mlp.gate.weight")
    )


def fp8_modules_to_not_convert(config: PretrainedConfig) -> list[str]:
    """The ``modules_to_not_convert`` list of a published FP8 checkpoint (Qwen3-*-FP8 style).

    lm_head must be in it: given a list, transformers skips only what it names (plus the model's fp32
    modules), so a missing lm_head would be swapped for an FP8 linear expecting a scale. The rest (embeddings,
    norms, routers) are not ``nn.Linear`` in transformers and are listed as the published configs list them.
    """
    names = ["lm_head", "model.embed_tokens", "model.norm"]
    per_layer = ["input_layernorm", "post_attention_layernorm", "mlp.gate"]
    if config.model_type == "qwen3_moe":
        per_layer += ["self_attn.q_norm", "self_attn.k_norm"]
    if config.model_type == "deepseek_v3":
        per_layer += ["self_attn.q_a_layernorm", "self_attn.kv_a_layernorm"]
    for layer in range(config.num_hidden_layers):
        names += [f"model.layers.{layer}.{name}" for name in per_layer]
    return names


def write_fp8_checkpoint(
    folder: Path,
    arch: str = "deepseek_v3",
    block: tuple[int, int] = (16, 16),
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    seed: int = 0,
    ragged: bool = False,
) -> Path:
    """Write a tiny FP8 block-scaled checkpoint of ``arch`` ("deepseek_v3" or "qwen3_moe") into ``folder``.

    Starts from ``tiny_model(arch, seed, ragged)``. On disk each decoder-layer linear weight
    ``model.layers.{l}.<...>.weight`` (per expert: ``model.layers.{l}.mlp.experts.{e}.gate_proj.weight``) is in
    ``fp8_dtype``, beside a float32 ``model.layers.{l}.<...>.weight_scale_inv``; everything else stays bf16 as
    saved. Returns ``folder``.

    ``reference_state_dict`` is only right where ``block`` divides every quantised dimension (64, 48, 32, 128,
    96 by default): with ``ragged`` transformers 5.23 refuses the folder, and a block such as (32, 32) makes it
    dequantise 48-row matrices wrongly without a word (see ``tiny_config``).
    """
    if arch not in FP8_ARCHS:
        raise ValueError(f"FP8 fixtures exist for {FP8_ARCHS}, not {arch!r}")
    model = tiny_model(arch, seed, ragged)
    _save_bf16(model, folder)

    def convert(key: str, tensor: torch.Tensor) -> TensorMap:
        if not _is_fp8_target(key, tensor):
            return {key: tensor}
        fp8, scale_inv = quantize_fp8_blocks(tensor, block, fp8_dtype)
        return {key: fp8, f"{key}_scale_inv": scale_inv}

    _rewrite_safetensors(folder, convert)
    _patch_config(
        folder,
        {
            "quant_method": "fp8",
            "fmt": FP8_FMT[fp8_dtype],
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
            "modules_to_not_convert": fp8_modules_to_not_convert(model.config),
        },
    )
    return folder


# --------------------------------------------------------------------------------------------------------------
# MXFP4 experts


def _e2m1_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (uint8 0..15, bit 3 = sign) of each value, already divided by its block scale."""
    grid = torch.tensor(E2M1_GRID)
    magnitude = (values.abs().unsqueeze(-1) - grid).abs().argmin(dim=-1)  # index into the grid
    sign = (values < 0) & (magnitude > 0)  # no negative zero
    return (magnitude + 8 * sign).to(torch.uint8)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 of ``weight`` [..., out, in]: (blocks uint8 [..., out, in/32, 16], scales uint8 [..., out, in/32]).

    Each 32 values along ``in`` share the exponent 2**ceil(log2(amax / 6)) (stored + 127; 127 for a zero
    block), so no value is clipped; byte j of a block holds value 2j in its low nibble, 2j + 1 in its high one.
    """
    *lead, out, inp = weight.shape
    assert inp % MXFP4_BLOCK == 0, f"input dimension {inp} is not a multiple of {MXFP4_BLOCK}"
    groups = weight.float().reshape(*lead, out, inp // MXFP4_BLOCK, MXFP4_BLOCK)  # [..., out, G, 32]
    amax = groups.abs().amax(dim=-1)  # [..., out, G]
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / E2M1_GRID[-1])), torch.zeros_like(amax))
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    nibbles = _e2m1_nibbles(groups / torch.exp2(exponent).unsqueeze(-1))  # [..., out, G, 32]
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # [..., out, G, 16]
    scales = (exponent + E8M0_BIAS).to(torch.uint8)  # [..., out, G]
    return blocks, scales


def _is_mxfp4_target(key: str) -> bool:
    """Whether a saved tensor is a fused routed-expert matrix that gpt-oss stores in MXFP4 (not its bias)."""
    return key.startswith("model.layers.") and key.endswith(MXFP4_EXPERT_PARAMS)


def mxfp4_modules_to_not_convert() -> list[str]:
    """gpt-oss's published ``modules_to_not_convert``: attention, router, embeddings and lm_head stay bf16."""
    return ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def write_mxfp4_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Write a tiny gpt-oss checkpoint with MXFP4 experts into ``folder``, from ``tiny_model("gpt_oss", seed)``.

    On disk ``model.layers.{l}.mlp.experts.gate_up_proj`` (bf16 [E, H, 2I] in transformers) becomes
    ``..._blocks`` uint8 [E, 2I, H/32, 16] and ``..._scales`` uint8 [E, 2I, H/32]; likewise ``down_proj``
    ([E, I, H] -> [E, H, I/32, 16] and [E, H, I/32]). Biases, attention, router, embeddings stay bf16.
    Returns ``folder``.
    """
    _save_bf16(tiny_model("gpt_oss", seed), folder)

    def convert(key: str, tensor: torch.Tensor) -> TensorMap:
        if not _is_mxfp4_target(key):
            return {key: tensor}
        blocks, scales = quantize_mxfp4(tensor.transpose(-1, -2))  # quantise [E, out, in] along in
        return {f"{key}_blocks": blocks, f"{key}_scales": scales}

    _rewrite_safetensors(folder, convert)
    _patch_config(folder, {"quant_method": "mxfp4", "modules_to_not_convert": mxfp4_modules_to_not_convert()})
    return folder


# --------------------------------------------------------------------------------------------------------------
# what transformers makes of a folder


def _dequantizing_config(folder: Path) -> QuantizationConfigMixin | None:
    """A quantization_config that makes transformers dequantise the folder's format on load, on any machine.

    On a CPU-only machine transformers 5.23 dequantises both formats by itself (with a warning); asking for it
    keeps a CUDA machine (with triton and ``kernels``) from loading native FP8 / MXFP4 modules instead.
    """
    method = json.loads((folder / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
    if method == "fp8":
        return FineGrainedFP8Config(dequantize=True)
    if method == "mxfp4":
        return Mxfp4Config(dequantize=True)
    return None


def load_with_transformers(folder: Path) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(folder, dtype=bf16)``, dequantised, on the CPU."""
    extra = {"quantization_config": config} if (config := _dequantizing_config(folder)) else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu", **extra).eval()


def reference_state_dict(folder: Path) -> TensorMap:
    """The state_dict (module keys, dequantised) that transformers itself loads from ``folder`` on the CPU.

    Module keys as transformers names them (fused experts: ``model.layers.{l}.mlp.experts.gate_up_proj``
    [E, 2I, H] for FP8 archs, [E, H, 2I] for gpt-oss); bf16, except what the model keeps in fp32
    (DeepSeek's ``e_score_correction_bias``).
    """
    model = load_with_transformers(folder)
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


def iter_stored(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (key, tensor) stored in the folder's safetensors, as on disk."""
    for path in _safetensors_files(folder):
        yield from _read_tensors(path)[0].items()
