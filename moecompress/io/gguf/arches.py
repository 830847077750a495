"""Per `model_type`, what llama.cpp needs to run a checkpoint: its arch, keys, refusals, tensor layouts.

Each `GGUFArch` states, for one transformers model type:

* `arch`: the llama.cpp architecture (`gguf.MODEL_ARCH`); tensor names come from `gguf`'s map
  for that arch (`moecompress.io.gguf.names`), with `key_aliases` where a checkpoint spells a
  name differently from the map;
* `check(config)`: settings this llama.cpp arch cannot represent, refused in one line (it
  would otherwise run and compute something else);
* `add_hparams(writer, config)`: the metadata keys the arch reads;
* `split(name, tensor, config)`: the layout transform from the checkpoint's tensor to llama.cpp's
  (identity for most; Llama's rotary permutation of q/k rows; MLA's kv_b split). It is written
  with torch view operations, so it runs on meta tensors to plan shapes and on real ones to write.

Supported: qwen3_moe (llama.cpp `qwen3moe`), deepseek_v3 (`deepseek2`, MLA attention) and
mixtral (`llama` with experts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, ExpertGatingFuncType, GGUFWriter

from moecompress.errors import MoecompressError
from moecompress.io.gguf import metadata

Split = Callable[[str, torch.Tensor, Any], list[tuple[str, torch.Tensor]]]


def _identity(name: str, tensor: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor)]


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers model type is written for one llama.cpp architecture."""

    model_type: str
    arch: MODEL_ARCH
    check: Callable[[Any], None]
    add_hparams: Callable[[GGUFWriter, Any], None]
    split: Split = _identity
    key_aliases: tuple[tuple[str, str], ...] = field(default=())

    @property
    def arch_name(self) -> str:
        """llama.cpp's name of the architecture (general.architecture)."""
        return MODEL_ARCH_NAMES[self.arch]


def _base(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'attn_q'."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


# ---------------------------------------------------------------- qwen3_moe -> qwen3moe
def _check_qwen3_moe(config: Any) -> None:
    rope = metadata.check_rope(config, "qwen3_moe", ("default", "yarn"))
    if rope.get("rope_type") == "yarn" and rope.get("attention_factor") is not None:
        raise MoecompressError("llama.cpp's qwen3moe derives YaRN's attention factor from the scaling factor; this "
                               f"checkpoint sets attention_factor {rope['attention_factor']}, which it cannot represent")
    metadata.check_no_sliding_window(config, "qwen3_moe")
    if list(getattr(config, "mlp_only_layers", None) or []) or int(getattr(config, "decoder_sparse_step", 1)) != 1:
        raise MoecompressError("llama.cpp's qwen3moe runs experts in every layer; this checkpoint has dense layers "
                               "(mlp_only_layers / decoder_sparse_step, e.g. a condensed output), which it cannot "
                               "represent")
    if not getattr(config, "norm_topk_prob", True):
        raise MoecompressError("llama.cpp's qwen3moe always renormalises the chosen experts' weights; this checkpoint "
                               "has norm_topk_prob false, so llama.cpp would compute other outputs")
    if getattr(config, "attention_bias", False):
        raise MoecompressError("llama.cpp's qwen3moe has no attention biases; this checkpoint has attention_bias true")


def _qwen3_moe_hparams(writer: GGUFWriter, config: Any) -> None:
    metadata.add_common(writer, config, int(config.num_experts), int(config.num_experts_per_tok))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
    rope = metadata.rope_settings(config)
    if rope.get("rope_type") == "yarn":
        metadata.add_yarn(writer, rope)


# ---------------------------------------------------------------- mixtral -> llama
def _check_mixtral(config: Any) -> None:
    metadata.check_rope(config, "mixtral")
    metadata.check_no_sliding_window(config, "mixtral")


def _mixtral_hparams(writer: GGUFWriter, config: Any) -> None:
    metadata.add_common(writer, config, int(config.num_local_experts), int(config.num_experts_per_tok))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_dimension_count(_head_dim(config))


def _rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows of each head from HF's half-split rotary order to llama.cpp's interleaved pairs.

    (heads*D, H): within a head, rows [0..D/2) and [D/2..D) become pairs (0, D/2), (1, D/2+1), ...
    """
    rows, hidden = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, hidden).transpose(1, 2).reshape(rows, hidden)


def _mixtral_split(name: str, tensor: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]]:
    base = _base(name)
    if base == "attn_q":
        return [(name, _rotary_rows(tensor, int(config.num_attention_heads)))]
    if base == "attn_k":
        return [(name, _rotary_rows(tensor, int(config.num_key_value_heads)))]
    return [(name, tensor)]


# ---------------------------------------------------------------- deepseek_v3 -> deepseek2 (MLA)
def _check_deepseek_v3(config: Any) -> None:
    rope = metadata.check_rope(config, "deepseek_v3", ("default", "yarn"))
    if rope.get("rope_type") == "yarn" and float(rope.get("mscale") or 1.0) != float(rope.get("mscale_all_dim") or 0.0):
        raise MoecompressError("llama.cpp's deepseek2 scales YaRN attention by mscale_all_dim alone; this checkpoint "
                               f"has mscale {rope.get('mscale')} != mscale_all_dim {rope.get('mscale_all_dim')}")
    if not getattr(config, "rope_interleave", True):
        raise MoecompressError("llama.cpp's deepseek2 applies rope to interleaved pairs; this checkpoint has "
                               "rope_interleave false, which it cannot represent")
    n_group = int(getattr(config, "n_group", 1) or 1)
    if n_group > 1 and int(config.n_routed_experts) % n_group:
        raise MoecompressError(f"{config.n_routed_experts} routed experts do not split into n_group={n_group} equal "
                               "groups, which llama.cpp's group-limited routing needs")


def _deepseek_v3_hparams(writer: GGUFWriter, config: Any) -> None:
    metadata.add_common(writer, config, int(config.n_routed_experts), int(config.num_experts_per_tok))
    kv_rank, rope_dim = int(config.kv_lora_rank), int(config.qk_rope_head_dim)
    writer.add_head_count_kv(1)  # MLA in its absorbed form: one shared latent "head"
    writer.add_key_length(kv_rank + rope_dim)
    writer.add_value_length(kv_rank)
    writer.add_key_length_mla(int(config.qk_nope_head_dim) + rope_dim)
    writer.add_value_length_mla(int(config.v_head_dim))
    writer.add_rope_dimension_count(rope_dim)
    writer.add_kv_lora_rank(kv_rank)
    # 0: queries without the low-rank path (attn_q); llama.cpp requires the key except for a few layer counts
    writer.add_q_lora_rank(int(getattr(config, "q_lora_rank", None) or 0))
    writer.add_leading_dense_block_count(int(getattr(config, "first_k_dense_replace", 0) or 0))
    writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
    writer.add_expert_shared_count(int(getattr(config, "n_shared_experts", 0) or 0))
    writer.add_expert_weights_scale(float(getattr(config, "routed_scaling_factor", 1.0)))
    writer.add_expert_weights_norm(bool(getattr(config, "norm_topk_prob", True)))
    writer.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    n_group = int(getattr(config, "n_group", 1) or 1)
    if n_group > 1:
        writer.add_expert_group_count(n_group)
        writer.add_expert_group_used_count(int(config.topk_group))
    rope = metadata.rope_settings(config)
    if rope.get("rope_type") == "yarn":  # llama.cpp reads 0.1 * mscale_all_dim (HF: mscale = 0.1 m ln(factor) + 1)
        metadata.add_yarn(writer, rope, 0.1 * float(rope.get("mscale_all_dim") or 0.0))


def _deepseek_split(name: str, tensor: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]]:
    """kv_b (heads*(nope+v), kv_rank) -> attn_k_b (heads, kv_rank, nope) and attn_v_b (heads, v, kv_rank)."""
    if _base(name) != "attn_kv_b":
        return [(name, tensor)]
    heads, nope, v_dim = int(config.num_attention_heads), int(config.qk_nope_head_dim), int(config.v_head_dim)
    per_head = tensor.reshape(heads, nope + v_dim, tensor.shape[-1])  # (heads, nope+v, kv_rank)
    k_b, v_b = per_head.split([nope, v_dim], dim=1)
    prefix = name[: -len("attn_kv_b.weight")]
    return [(prefix + "attn_k_b.weight", k_b.transpose(1, 2)), (prefix + "attn_v_b.weight", v_b)]


ARCHES: dict[str, GGUFArch] = {
    spec.model_type: spec
    for spec in (
        GGUFArch("qwen3_moe", MODEL_ARCH.QWEN3MOE, _check_qwen3_moe, _qwen3_moe_hparams),
        GGUFArch("deepseek_v3", MODEL_ARCH.DEEPSEEK2, _check_deepseek_v3, _deepseek_v3_hparams, _deepseek_split,
                 key_aliases=(("e_score_correction_bias", "e_score_correction.bias"),)),
        GGUFArch("mixtral", MODEL_ARCH.LLAMA, _check_mixtral, _mixtral_hparams, _mixtral_split),
    )
}


def gguf_arch(model_type: str) -> GGUFArch:
    """The GGUF architecture spec for a model type; a one-line refusal naming the supported ones."""
    spec = ARCHES.get(model_type)
    if spec is None:
        raise MoecompressError(f"export gguf has no llama.cpp mapping for model_type {model_type!r}; supported: "
                               f"{', '.join(sorted(ARCHES))}")
    return spec
