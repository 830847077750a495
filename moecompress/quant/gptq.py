"""GPTQ: accurate post-training quantisation for generative pre-trained transformers (arXiv 2210.17323).

One linear map W (out, in) at a time, statistics then solve:

1. statistics (`add_batch`): H = (2 / sum_t c_t) sum_t c_t x_t x_t^T over the map's calibration
   inputs x_t (for a routed expert: the tokens routed to it). c_t = 1 is plain GPTQ; c_t = the
   token's gate value for that expert is MoEQuant's affinity-guided Hessian
   (H_e = sum_{t->e} c_{t,e} x x^T; the overall scale of H does not change GPTQ's result).
2. solve (`quantize`): dead inputs (H_ii = 0) get W[:, i] = 0; with act-order, columns are
   visited by decreasing H_ii; H += damp * mean(diag H) * I (damp raised until the Cholesky
   factorisation succeeds); U = upper Cholesky factor of H^-1. Columns are quantised in
   blocks of 128; each column's rounding error e = (w - q) / U_ii is propagated to the
   not-yet-quantised columns, inside the block via U[i, i:] and after the block in one
   matrix product. With groups, the grid (scale, zero) is recomputed from the already
   updated weights at the first column of each group (in visiting order; g_idx records
   each original column's group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.quant.rtn import grid_params, quantize_codes
from moecompress.quant.spec import QuantizedWeight, QuantSpec

BLOCK_SIZE = 128
MAX_DAMP_TRIES = 12


@dataclass
class GPTQResult:
    """A GPTQ solve: the quantised weight, the damping that succeeded and the propagated loss."""

    weight: QuantizedWeight
    damp: float  # damping fraction actually used (>= the requested one)
    loss: float  # sum over columns of (w - q)^2 / U_ii^2 / 2 (GPTQ's own error measure)


class GPTQ:
    """Hessian statistics of one linear map's inputs, then GPTQ solves for any spec."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32)  # (in, in)
        self.total_weight = 0.0  # sum of token weights c_t seen so far
        self.tokens = 0  # number of tokens seen (the RTN fall-back threshold counts these)

    def add_batch(self, x: torch.Tensor, token_weight: torch.Tensor | None = None) -> None:
        """Accumulate inputs x (..., in); token_weight (N,) >= 0 gives MoEQuant's weighted Hessian."""
        x = x.detach().reshape(-1, self.in_features).float()  # (N, in)
        count = x.shape[0]
        if count == 0:
            return
        c = torch.ones(count) if token_weight is None else token_weight.detach().reshape(-1).float().clamp(min=0)
        batch_weight = float(c.sum())
        self.tokens += count
        if batch_weight <= 0:
            return
        new_total = self.total_weight + batch_weight
        self.hessian.mul_(self.total_weight / new_total)
        scaled = x * torch.sqrt(2.0 * c / new_total)[:, None]  # (N, in)
        self.hessian.addmm_(scaled.T, scaled)
        self.total_weight = new_total

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, block_size: int = BLOCK_SIZE) -> GPTQResult:
        """Quantise weight (out, in) with the accumulated statistics (the weight is not modified)."""
        out_features, in_features = weight.shape
        if in_features != self.in_features:
            raise ValueError(f"weight has {in_features} inputs, statistics have {self.in_features}")
        w = weight.detach().float().clone()  # (out, in), updated in place by error propagation
        h = self.hessian.clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        perm = torch.argsort(torch.diag(h), descending=True, stable=True) if spec.act_order else None
        if perm is not None:
            w = w[:, perm]
            h = h[perm][:, perm]
        upper, damp = _inverse_cholesky_upper(h, spec.damp)  # (in, in)

        group = spec.effective_group(in_features)
        num_groups = -(-in_features // group)
        codes = torch.zeros(out_features, in_features, dtype=torch.uint8)
        scales = torch.zeros(num_groups, out_features, dtype=torch.float16)
        zeros = torch.zeros(num_groups, out_features, dtype=torch.int32)
        loss = 0.0
        scale = zero = None
        for i1 in range(0, in_features, block_size):
            i2 = min(i1 + block_size, in_features)
            block = w[:, i1:i2].clone()  # (out, B)
            errors = torch.zeros_like(block)
            u_block = upper[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if col % group == 0:
                    end = min(col + group, in_features)
                    span = torch.cat([block[:, i:], w[:, i2:end]], dim=1) if end > i2 else block[:, i : i + end - col]
                    scale, zero = grid_params(span, spec.bits, spec.sym)
                    scales[col // group] = scale.half()
                    zeros[col // group] = zero.to(torch.int32)
                column = block[:, i]  # (out,)
                q = quantize_codes(column[:, None], scale, zero, spec.bits)[:, 0]
                codes[:, col] = q.to(torch.uint8)
                dequant = scale * (q - zero)
                d = u_block[i, i]
                err = (column - dequant) / d
                loss += float(((column - dequant) ** 2).sum() / (2 * d * d))
                block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
                errors[:, i] = err
            if i2 < in_features:
                w[:, i2:] -= errors @ upper[i1:i2, i2:]

        g_idx = (torch.arange(in_features) // group).to(torch.int32)
        if perm is not None:
            inverse = torch.argsort(perm)
            codes = codes[:, inverse].contiguous()
            g_idx = g_idx[inverse].contiguous()
        quantized = QuantizedWeight(codes, scales, zeros, g_idx, spec.bits, group, spec.sym and spec.bits > 1)
        return GPTQResult(quantized, damp, loss)


def _inverse_cholesky_upper(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp until it exists."""
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(MAX_DAMP_TRIES):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp
        damp = damp * 2 if damp >= 0.01 else damp + 0.01
    raise RuntimeError(f"GPTQ: the Hessian is not positive definite even with damping {damp:.3g}")

