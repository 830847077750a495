"""The per-window record every serving client returns, so `suite.compare` scores them all the same way.

vLLM's worker builds it inside vLLM's own venv (it imports only vLLM and the standard library);
the clients in the project's venv (llama.cpp, GPTQModel) build it from their log-probabilities here.
"""

from __future__ import annotations

from typing import Any

import torch


def window_record(logprobs: torch.Tensor, ids: list[int]) -> dict[str, Any]:
    """A window's record from a client's log-probabilities (S, V) at every position of `ids` (S tokens).

    The logprobs of the window's next tokens, the rank-1 token at each position, and the greedy
    next token after the window with its logprob.
    """
    next_ids = torch.tensor(ids[1:])  # (S-1,)
    generated = int(logprobs[-1].argmax())
    return {"chosen_logprobs": logprobs[:-1].gather(-1, next_ids[:, None]).squeeze(-1).tolist(),
            "top1": logprobs[:-1].argmax(-1).tolist(), "generated": generated,
            "generated_logprob": float(logprobs[-1, generated])}
