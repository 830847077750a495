"""Tiny configs, one per supported model_type, built from transformers' own config classes.

Every adapter needs an entry here (the contract test fails otherwise). Sizes are small
enough for a full forward in milliseconds: 2-3 layers, hidden 64, 8 experts, top-2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import transformers

COMMON: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

TINY_CONFIGS: dict[str, Callable[[], Any]] = {}


def tiny(model_type: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Register a tiny-config builder for `model_type`."""

    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        TINY_CONFIGS[model_type] = fn
        return fn

    return wrap


@tiny("qwen3_moe")
def _qwen3_moe() -> Any:
    return transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[0],
    )


# Architecture batches live in their own files so they can be edited independently;
# importing them registers their builders in TINY_CONFIGS.
from tests.adapters import tiny_configs_a, tiny_configs_b  # noqa: E402,F401
