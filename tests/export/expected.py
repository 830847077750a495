"""What each GGUF tensor must hold, written out independently of moecompress's export code.

From a checkpoint's transformers (in-memory) state dict, per llama.cpp arch: the GGUF name of
every tensor and its values after llama.cpp's layout transform, numpy shape outermost first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


def _rotary_pairs(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered 0, D/2, 1, D/2+1, ... (HF half-split rope -> llama.cpp pairs)."""
    dim = weight.shape[0] // heads
    order = [h * dim + (j // 2) + (j % 2) * (dim // 2) for h in range(heads) for j in range(dim)]
    return weight[order]


def expected_tensors(state: dict[str, torch.Tensor], config: Any) -> dict[str, np.ndarray]:
    """GGUF name -> expected float32 values for a qwen3_moe, mixtral or deepseek_v3 state dict."""
    mt = config.model_type
    out = {"token_embd.weight": _np(state["model.embed_tokens.weight"]),
           "output_norm.weight": _np(state["model.norm.weight"])}
    if not config.tie_word_embeddings:
        out["output.weight"] = _np(state["lm_head.weight"])
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = _np(state[p + "input_layernorm.weight"])
        out[b + "ffn_norm.weight"] = _np(state[p + "post_attention_layernorm.weight"])
        out[b + "attn_output.weight"] = _np(state[p + "self_attn.o_proj.weight"])
        if mt == "deepseek_v3":
            if config.q_lora_rank:
                out[b + "attn_q_a.weight"] = _np(state[p + "self_attn.q_a_proj.weight"])
                out[b + "attn_q_a_norm.weight"] = _np(state[p + "self_attn.q_a_layernorm.weight"])
                out[b + "attn_q_b.weight"] = _np(state[p + "self_attn.q_b_proj.weight"])
            else:
                out[b + "attn_q.weight"] = _np(state[p + "self_attn.q_proj.weight"])
            out[b + "attn_kv_a_mqa.weight"] = _np(state[p + "self_attn.kv_a_proj_with_mqa.weight"])
            out[b + "attn_kv_a_norm.weight"] = _np(state[p + "self_attn.kv_a_layernorm.weight"])
            kv_b = _np(state[p + "self_attn.kv_b_proj.weight"])  # (heads*(nope+v), rank)
            nope, v = config.qk_nope_head_dim, config.v_head_dim
            rows = nope + v
            out[b + "attn_k_b.weight"] = np.stack([kv_b[h * rows: h * rows + nope].T
                                                   for h in range(config.num_attention_heads)])
            out[b + "attn_v_b.weight"] = np.stack([kv_b[h * rows + nope: (h + 1) * rows]
                                                   for h in range(config.num_attention_heads)])
        else:
            q, k = _np(state[p + "self_attn.q_proj.weight"]), _np(state[p + "self_attn.k_proj.weight"])
            if mt == "mixtral":
                q, k = _rotary_pairs(q, config.num_attention_heads), _rotary_pairs(k, config.num_key_value_heads)
            out[b + "attn_q.weight"], out[b + "attn_k.weight"] = q, k
            out[b + "attn_v.weight"] = _np(state[p + "self_attn.v_proj.weight"])
            if mt == "qwen3_moe":
                out[b + "attn_q_norm.weight"] = _np(state[p + "self_attn.q_norm.weight"])
                out[b + "attn_k_norm.weight"] = _np(state[p + "self_attn.k_norm.weight"])
        if p + "mlp.gate_proj.weight" in state:  # a dense layer (DeepSeek's first layers)
            for proj in ("gate", "up", "down"):
                out[b + f"ffn_{proj}.weight"] = _np(state[p + f"mlp.{proj}_proj.weight"])
            continue
        out[b + "ffn_gate_inp.weight"] = _np(state[p + "mlp.gate.weight"])
        gate_up = _np(state[p + "mlp.experts.gate_up_proj"])  # (E, 2I, H)
        width = gate_up.shape[1] // 2
        out[b + "ffn_gate_exps.weight"] = gate_up[:, :width]
        out[b + "ffn_up_exps.weight"] = gate_up[:, width:]
        out[b + "ffn_down_exps.weight"] = _np(state[p + "mlp.experts.down_proj"])  # (E, H, I)
        if mt == "deepseek_v3":
            out[b + "exp_probs_b.bias"] = _np(state[p + "mlp.gate.e_score_correction_bias"])
            for proj in ("gate", "up", "down"):
                out[b + f"ffn_{proj}_shexp.weight"] = _np(state[p + f"mlp.shared_experts.{proj}_proj.weight"])
    return out
