"""Published configs of public MoE models, as dicts, and configs with fewer decoder layers.

The dicts are the configs on the Hugging Face hub (config.json of Qwen/Qwen3-30B-A3B,
mistralai/Mixtral-8x7B-v0.1, deepseek-ai/DeepSeek-V3) minus bookkeeping keys
(architectures, torch_dtype, transformers_version). DeepSeek-V3 comes twice: `deepseek_v3`
without its fp8 `quantization_config` (a bf16 checkpoint, as a bf16 conversion of the model
stores it) and `deepseek_v3_fp8` with it, as published: its decoder layers' linear weights
are float8 e4m3 with float32 128x128 block scales (`checkpoints.py` writes them so).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

QWEN3_30B_A3B: dict[str, Any] = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
    "max_window_layers": 48, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "norm_topk_prob": True,
    "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu",
    "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
    "router_aux_loss_coef": 0.001, "output_router_logits": False, "initializer_range": 0.02,
    "bos_token_id": 151643, "eos_token_id": 151645, "use_cache": True,
}

MIXTRAL_8X7B: dict[str, Any] = {
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_local_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-5,
    "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu", "attention_dropout": 0.0,
    "router_aux_loss_coef": 0.02, "output_router_logits": False, "initializer_range": 0.02,
    "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
}

DEEPSEEK_V3: dict[str, Any] = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "first_k_dense_replace": 3, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "moe_layer_freq": 1, "ep_size": 1,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "num_attention_heads": 128, "num_key_value_heads": 128, "vocab_size": 129280,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 1, "use_cache": True,
}

# DeepSeek-V3's config.json as published: FP8 weights in 128x128 blocks (no modules_to_not_convert).
DEEPSEEK_V3_FP8_QUANTIZATION: dict[str, Any] = {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
}
DEEPSEEK_V3_FP8: dict[str, Any] = {**DEEPSEEK_V3, "quantization_config": DEEPSEEK_V3_FP8_QUANTIZATION}


@dataclass(frozen=True)
class ModelSpec:
    """A public MoE model: its published config and the transformers config class that reads it."""

    name: str
    title: str
    config_class: str  # attribute of `transformers`
    published: dict[str, Any] = field(repr=False)

    @property
    def full_layers(self) -> int:
        """Decoder layers of the published model."""
        return int(self.published["num_hidden_layers"])

    def config_dict(self, layers: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The published config with `layers` decoder layers (then `overrides` applied).

        DeepSeek-V3 keeps its 3 leading dense layers only at full depth; a shallower copy keeps
        one dense layer (none at depth 1) so that it still has MoE layers.
        """
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        values = {**copy.deepcopy(self.published), "num_hidden_layers": layers}
        if "max_window_layers" in values:
            values["max_window_layers"] = layers
        if "first_k_dense_replace" in values and layers < self.full_layers:
            values["first_k_dense_replace"] = min(1, layers - 1)
        values.update(overrides or {})
        return values

    def config(self, layers: int, overrides: dict[str, Any] | None = None) -> Any:
        """A transformers config object for `config_dict(layers, overrides)`."""
        import transformers

        values = self.config_dict(layers, overrides)
        values.pop("model_type")
        return getattr(transformers, self.config_class)(**values)


SPECS: dict[str, ModelSpec] = {
    spec.name: spec for spec in (
        ModelSpec("qwen3_30b_a3b", "Qwen3-30B-A3B", "Qwen3MoeConfig", QWEN3_30B_A3B),
        ModelSpec("mixtral_8x7b", "Mixtral-8x7B", "MixtralConfig", MIXTRAL_8X7B),
        ModelSpec("deepseek_v3", "DeepSeek-V3", "DeepseekV3Config", DEEPSEEK_V3),
        ModelSpec("deepseek_v3_fp8", "DeepSeek-V3 (FP8 blocks, as published)", "DeepseekV3Config", DEEPSEEK_V3_FP8),
    )
}
