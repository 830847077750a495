"""Tiny configs for batch B: sigmoid / correction-bias / group-limited routers (see tiny_configs.py).

Group-limited routers use n_group=2, topk_group=1: the contract keeps 2 of the 4 experts in
each group, so masking changes which group wins and which experts are chosen.
"""

from __future__ import annotations

from typing import Any

import transformers

from tests.adapters.tiny_configs import COMMON, tiny

# Special-token ids inside the tiny vocabulary, for configs whose defaults point past it.
TOKENS: dict[str, Any] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Multi-head latent attention (DeepSeek-V2/V3 family) at tiny sizes: one key/value head per
# query head, and a rotary part as wide as COMMON["head_dim"] (which sizes the rotary table).
MLA: dict[str, Any] = dict(
    COMMON, num_key_value_heads=COMMON["num_attention_heads"], kv_lora_rank=16, q_lora_rank=24,
    qk_rope_head_dim=COMMON["head_dim"], qk_nope_head_dim=8, v_head_dim=16,
)


@tiny("deepseek_v2")
def _deepseek_v2() -> Any:
    return transformers.DeepseekV2Config(
        **MLA, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5,
    )


@tiny("deepseek_v3")
def _deepseek_v3() -> Any:
    return transformers.DeepseekV3Config(
        **MLA, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    )


@tiny("glm4_moe")
def _glm4_moe() -> Any:
    return transformers.Glm4MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
    )


@tiny("dots1")
def _dots1() -> Any:
    return transformers.Dots1Config(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
    )


@tiny("ernie4_5_moe")
def _ernie4_5_moe() -> Any:
    return transformers.Ernie4_5_MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, moe_num_experts=8, moe_k=2,
        moe_num_shared_experts=1, moe_layer_start_index=1,
    )


# Sparse (indexed) attention: the indexer looks at a few heads and keeps index_topk keys.
DSA: dict[str, Any] = dict(MLA, index_topk=8, index_head_dim=16, index_n_heads=2)


@tiny("deepseek_v32")
def _deepseek_v32() -> Any:
    return transformers.DeepseekV32Config(
        **DSA, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    )


@tiny("glm4_moe_lite")
def _glm4_moe_lite() -> Any:
    return transformers.Glm4MoeLiteConfig(
        **MLA, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"],
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.8,
    )


@tiny("glm_moe_dsa")
def _glm_moe_dsa() -> Any:
    return transformers.GlmMoeDsaConfig(
        **DSA, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    )


@tiny("minimax_m2")
def _minimax_m2() -> Any:
    return transformers.MiniMaxM2Config(
        **COMMON, **TOKENS, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
    )


@tiny("lfm2_moe")
def _lfm2_moe() -> Any:
    return transformers.Lfm2MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        num_dense_layers=1, use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=1.5,
        layer_types=["full_attention", "conv", "full_attention"], conv_L_cache=3,
    )


@tiny("kimi_linear")
def _kimi_linear() -> Any:
    return transformers.KimiLinearConfig(
        **MLA, **TOKENS, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_token=2, num_shared_experts=1, num_expert_group=2, topk_group=1, moe_renormalize=True,
        routed_scaling_factor=2.0, mlp_layer_types=["dense", "sparse", "sparse"],
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_head_dim=16, linear_num_heads=4, linear_conv_kernel_dim=4,
    )


@tiny("exaone_moe")
def _exaone_moe() -> Any:
    return transformers.ExaoneMoeConfig(
        **COMMON, **TOKENS, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        sliding_window=8, sliding_window_pattern=2,
    )


@tiny("afmoe")
def _afmoe() -> Any:
    return transformers.AfmoeConfig(
        **COMMON, **TOKENS, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1, route_scale=1.5,
        global_attn_every_n_layers=2, sliding_window=8,
    )


@tiny("solar_open")
def _solar_open() -> Any:
    return transformers.SolarOpenConfig(
        **COMMON, **TOKENS, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
    )


@tiny("mimo_v2_flash")
def _mimo_v2_flash() -> Any:
    return transformers.MiMoV2FlashConfig(
        **dict(COMMON, head_dim=24), **TOKENS, v_head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        mlp_layer_types=["dense", "sparse", "sparse"], n_group=2, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=1.5, sliding_window=8,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
    )


@tiny("laguna")
def _laguna() -> Any:
    return transformers.LagunaConfig(
        **COMMON, **TOKENS, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
        mlp_layer_types=["dense", "sparse", "sparse"], moe_routed_scaling_factor=1.5,
        moe_router_logit_softcapping=2.0, sliding_window=8,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
    )


@tiny("hy_v3")
def _hy_v3() -> Any:
    return transformers.HYV3Config(
        **COMMON, **TOKENS, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, num_shared_experts=1, router_scaling_factor=2.0,
        mlp_layer_types=["dense", "sparse", "sparse"],
    )


@tiny("hy_v4")
def _hy_v4() -> Any:
    return transformers.HYV4Config(
        **DSA, **TOKENS, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"],
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.0, hc_mult=2,
        swiglu_limit=0.5,
    )


@tiny("axk1")
def _axk1() -> Any:
    return transformers.AXK1Config(
        **MLA, **TOKENS, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"],
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    )


@tiny("axk2")
def _axk2() -> Any:
    return transformers.AXK2Config(
        **DSA, **TOKENS, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"],
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, gated_norm_rank=8,
    )


@tiny("beam")
def _beam() -> Any:
    return transformers.BeamConfig(
        **COMMON, **TOKENS, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, mlp_layer_types=["dense", "sparse", "sparse"], n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )


@tiny("dots3_note_text")
def _dots3_note_text() -> Any:
    return transformers.Dots3NoteTextConfig(
        **DSA, **TOKENS, intermediate_size=96, moe_intermediate_size=32, shared_experts_intermediate_size=48,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        mlp_layer_types=["dense", "sparse", "sparse"], n_group=2, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.0, sliding_window=8,
        layer_types=["indexed_attention", "sliding_attention", "indexed_attention"],
        # The sliding-window layers' attention has its own (swa_*) sizes.
        swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=24, swa_kv_lora_rank=16,
        swa_head_dim=24, swa_qk_nope_head_dim=8, swa_v_head_dim=16,
    )


@tiny("kolibri1")
def _kolibri1() -> Any:
    return transformers.Kolibri1Config(
        **COMMON, **TOKENS, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )


@tiny("flint")
def _flint() -> Any:
    return transformers.FlintConfig(
        **COMMON, **TOKENS, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        mlp_only_layers=[0], sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )


@tiny("inkling2_text")
def _inkling2_text() -> Any:
    return transformers.Inkling2TextConfig(
        **COMMON, **TOKENS, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
        sliding_window_size=8, d_rel=4, rel_extent=8, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, route_scale=2.0, n_layers_per_attn_res_block=2, unpadded_vocab_size=128,
        layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"], mlp_gate_softcap=1.0, mlp_up_softcap=1.0,
    )


@tiny("inkling_text")
def _inkling_text() -> Any:
    return transformers.InklingTextConfig(
        **COMMON, **TOKENS, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
        sliding_window_size=8, d_rel=4, rel_extent=8, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, route_scale=2.0,
        mlp_layer_types=["dense", "sparse", "sparse"], logits_mup_width_multiplier=1.0,
        layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"], unpadded_vocab_size=128,
    )


@tiny("dbrx")
def _dbrx() -> Any:
    # DBRX's attention reads attn_config.rope_theta and clamps with clip_qkv, which released
    # configs set but the config class leaves undefined / None.
    return transformers.DbrxConfig(
        d_model=64, n_heads=4, n_layers=3, max_seq_len=256, vocab_size=128, tie_word_embeddings=False,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0), **TOKENS,
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2, moe_normalize_expert_weights=1.0),
    )
