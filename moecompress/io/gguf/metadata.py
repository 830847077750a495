"""GGUF metadata every architecture shares: sizes, attention, rope, norm, experts, provenance.

Per-architecture keys are added by `moecompress.io.gguf.arches`; this module holds what reads
the same transformers config fields for all of them, and the refusals for settings llama.cpp
would silently compute differently (rope scaling it is not told about, sliding windows).
"""

from __future__ import annotations

import json
from typing import Any

from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType, RopeScalingType

from moecompress.errors import MoecompressError

MANIFEST_KEY = "moecompress.manifest"  # the export manifest (JSON), as moecompress_manifest.json holds for folders


def rope_settings(config: Any) -> dict[str, Any]:
    """The rope parameters of a transformers 5 config (`rope_parameters`, else the older fields)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return dict(params)
    legacy = dict(getattr(config, "rope_scaling", None) or {})
    legacy.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    legacy.setdefault("rope_type", legacy.get("type", "default"))
    return legacy


def check_rope(config: Any, model_type: str, kinds: tuple[str, ...] = ("default",)) -> dict[str, Any]:
    """The rope parameters, refused in one line when their type is not one of `kinds` (what the arch applies)."""
    rope = rope_settings(config)
    kind = rope.get("rope_type", "default")
    if kind not in kinds:
        raise MoecompressError(f"export gguf writes {model_type} checkpoints with {' or '.join(kinds)} rope only; this "
                               f"one uses rope_type {kind!r} (its scaling would be lost, changing the logits)")
    return rope


def add_yarn(writer: GGUFWriter, rope: dict[str, Any], log_multiplier: float | None = None) -> None:
    """YaRN rope scaling keys: factor, original context, beta_fast / beta_slow (and DeepSeek's log multiplier)."""
    writer.add_rope_scaling_type(RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast") or 32.0))
    writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow") or 1.0))
    if log_multiplier is not None:
        writer.add_rope_scaling_yarn_log_mul(log_multiplier)


def check_no_sliding_window(config: Any, model_type: str) -> None:
    """Refuse a sliding-window attention llama.cpp's arch does not implement for this model type."""
    window = getattr(config, "sliding_window", None)
    used = getattr(config, "use_sliding_window", window is not None)
    if window is not None and used:
        raise MoecompressError(f"this {model_type} checkpoint uses sliding-window attention (window {window}), which "
                               "llama.cpp does not apply for this architecture")


def add_common(writer: GGUFWriter, config: Any, num_experts: int, top_k: int) -> None:
    """Sizes, attention heads, norm epsilon, rope base and expert counts (keys under the arch's name)."""
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope_settings(config).get("rope_theta", 10000.0)))
    writer.add_expert_count(int(num_experts))
    writer.add_expert_used_count(int(top_k))


def add_provenance(writer: GGUFWriter, name: str, file_type: LlamaFileType, manifest: dict[str, Any]) -> None:
    """general.* keys (name, file type, quantisation version) and the moecompress manifest."""
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_string(MANIFEST_KEY, json.dumps(manifest, sort_keys=True, default=str))
