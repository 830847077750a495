"""Shared helpers for tests: seeded tiny models with decisive routing."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every weight from a seeded normal so routing is decisive and biases non-zero.

    Norm weights stay near 1; matrices get std 0.15, vectors (biases, correction biases) std 0.1.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or "inv_freq" in name:
                continue
            owner = name.rpartition(".")[0].rpartition(".")[2].lower()  # module that owns the tensor
            if tensor.dim() == 1 and "norm" in owner:
                tensor.copy_(1.0 + 0.05 * torch.randn(tensor.shape, generator=gen))
            elif tensor.dim() >= 2:
                tensor.copy_(0.15 * torch.randn(tensor.shape, generator=gen))
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
    return model


def tiny_model(config: Any, seed: int = 0) -> torch.nn.Module:
    """A tiny fp32 model from `config` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def token_batch(vocab_size: int, batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    """Seeded random token ids (batch, length)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


def contract_keep(adapter, config, num_experts: int) -> list[int]:
    """Experts kept in the adapter contract tests: every other expert, respecting groups and top-k."""
    groups = adapter.groups(config)
    top_k = adapter.top_k(config)
    if groups is None:
        keep = list(range(0, num_experts, 2))
        if len(keep) < top_k:
            keep = list(range(top_k))
        return keep
    n_group, _ = groups
    per_group = num_experts // n_group
    kept_per_group = max(2, per_group // 2)
    return [g * per_group + j for g in range(n_group) for j in range(per_group - kept_per_group, per_group)]
