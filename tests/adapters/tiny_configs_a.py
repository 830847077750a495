"""Tiny configs for one batch of architectures (see tiny_configs.py)."""

from __future__ import annotations

from typing import Any

import transformers

from tests.adapters.tiny_configs import COMMON, tiny


@tiny("mixtral")
def _mixtral() -> Any:
    return transformers.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)


@tiny("qwen2_moe")
def _qwen2_moe() -> Any:
    return transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0],
    )


@tiny("olmoe")
def _olmoe() -> Any:
    return transformers.OlmoeConfig(**COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2)


@tiny("phimoe")
def _phimoe() -> Any:
    return transformers.PhimoeConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)


@tiny("granitemoe")
def _granitemoe() -> Any:
    return transformers.GraniteMoeConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)


@tiny("granitemoeshared")
def _granitemoeshared() -> Any:
    return transformers.GraniteMoeSharedConfig(
        **COMMON, intermediate_size=32, shared_intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
    )


@tiny("granitemoe_swa")
def _granitemoe_swa() -> Any:
    return transformers.GraniteMoeSWAConfig(
        **COMMON, intermediate_size=32, shared_intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )


@tiny("granitemoehybrid")
def _granitemoehybrid() -> Any:
    return transformers.GraniteMoeHybridConfig(
        **COMMON, intermediate_size=32, shared_intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16,
    )


@tiny("gpt_oss")
def _gpt_oss() -> Any:
    return transformers.GptOssConfig(
        **COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )


# gated-DeltaNet sizes shared by the Qwen3-Next family
_LINEAR_ATTENTION = dict(
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
)


@tiny("qwen3_next")
def _qwen3_next() -> Any:
    return transformers.Qwen3NextConfig(
        **COMMON, **_LINEAR_ATTENTION, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0],
        layer_types=["linear_attention", "full_attention", "linear_attention"],
    )


@tiny("qwen3_5_moe_text")
def _qwen3_5_moe_text() -> Any:
    return transformers.Qwen3_5MoeTextConfig(
        **COMMON, **_LINEAR_ATTENTION, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention", "linear_attention"],
    )


@tiny("flex_olmo")
def _flex_olmo() -> Any:
    return transformers.FlexOlmoConfig(
        **COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2, pad_token_id=1, eos_token_id=2,
    )


@tiny("minimax")
def _minimax() -> Any:
    return transformers.MiniMaxConfig(
        **COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, block_size=8,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
    )


@tiny("hunyuan_v1_moe")
def _hunyuan_v1_moe() -> Any:
    return transformers.HunYuanMoEV1Config(**COMMON, intermediate_size=32, num_experts=8, moe_topk=2)


@tiny("cohere2_moe")
def _cohere2_moe() -> Any:
    return transformers.Cohere2MoeConfig(
        **COMMON, intermediate_size=32, prefix_dense_intermediate_size=96, num_experts=8, num_experts_per_tok=2,
        expert_selection_fn="sigmoid", norm_topk_prob=True, mlp_layer_types=["dense", "sparse", "sparse"],
        sliding_window=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


@tiny("jamba")
def _jamba() -> Any:
    # layers: mamba+MoE, attention+dense MLP, mamba+MoE
    return transformers.JambaConfig(
        **COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2, expert_layer_period=2,
        expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8,
    )


@tiny("nemotron_h")
def _nemotron_h() -> Any:
    # one mixer per layer: Mamba-2, MoE, attention, MoE; group-limited sigmoid routing
    return transformers.NemotronHConfig(
        **{**COMMON, "num_hidden_layers": 4},
        layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
        intermediate_size=96, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=1, chunk_size=16,
    )


@tiny("bailing_hybrid")
def _bailing_hybrid() -> Any:
    # layers: KDA + dense MLP, MLA + MoE, KDA + MoE. MLA needs as many KV heads as heads, and
    # qk_rope_head_dim == head_dim keeps the config stable through save/reload.
    return transformers.BailingHybridConfig(
        **{**COMMON, "num_key_value_heads": 4}, intermediate_size=96, moe_intermediate_size=32,
        num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
        first_k_dense_replace=1, layer_group_size=2,
        kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, pad_token_id=0, eos_token_id=2,
    )


@tiny("minimax_m3_vl_text")
def _minimax_m3_vl_text() -> Any:
    return transformers.MiniMaxM3VLTextConfig(
        **COMMON, intermediate_size=32, dense_intermediate_size=96, shared_intermediate_size=48, num_local_experts=8,
        num_experts_per_tok=2, rotary_dim=8, mlp_layer_types=["dense", "sparse", "sparse"], pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )


@tiny("aria_text")
def _aria_text() -> Any:
    return transformers.AriaTextConfig(
        **COMMON, intermediate_size=32, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1,
    )


@tiny("llama4_text")
def _llama4_text() -> Any:
    # MoE on layers 0 and 2, a dense MLP (intermediate_size_mlp) on layer 1; top-1 like the released models
    return transformers.Llama4TextConfig(
        **COMMON, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=8, num_experts_per_tok=1,
        moe_layers=[0, 2], attention_chunk_size=16,
    )
