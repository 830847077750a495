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
        if self.tokens == 0 and self.hessian.device != x.device:  # statistics live where the inputs are
            self.hessian = self.hessian.to(x.device)
        c = (torch.ones(count, device=x.device) if token_weight is None
             else token_weight.detach().reshape(-1).float().clamp(min=0).to(x.device))
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
        if weight.shape[1] != self.in_features:
            raise ValueError(f"weight has {weight.shape[1]} inputs, statistics have {self.in_features}")
        return gptq_batched(weight[None], self.hessian[None], spec, block_size)[0]


def gptq_batched(weights: torch.Tensor, hessians: torch.Tensor, spec: QuantSpec, block_size: int = BLOCK_SIZE
                 ) -> list[GPTQResult]:
    """GPTQ of N maps of one shape and one spec at once: weights (N, out, in), hessians (N, in, in).

    Each map gets exactly the result of solving it alone (rows and maps never mix); batching
    only removes the per-map Python loop over columns, which dominates for many small experts.
    Neither input is modified.
    """
    count, out_features, in_features = weights.shape
    if hessians.shape != (count, in_features, in_features):
        raise ValueError(f"hessians {tuple(hessians.shape)} do not match weights {tuple(weights.shape)}")
    w = weights.detach().float().clone()  # (N, out, in), updated in place by error propagation
    h = hessians.detach().float().clone()  # (N, in, in)
    diag = torch.diagonal(h, dim1=1, dim2=2)  # (N, in) view
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    w.masked_fill_(dead[:, None, :], 0.0)
    group = spec.effective_group(in_features)
    perm = group_order = None
    if spec.act_order:
        perm = torch.argsort(diag, dim=1, descending=True, stable=True)  # (N, in)
    elif spec.group_aware:
        perm, group_order = group_aware_order(diag, group)  # (N, in), (N, G)
    if perm is not None:
        w = w.gather(2, perm[:, None, :].expand_as(w))
        h = h.gather(1, perm[:, :, None].expand_as(h)).gather(2, perm[:, None, :].expand_as(h))
    upper, damps = _inverse_cholesky_upper(h, spec.damp)  # (N, in, in), (N,)

    num_groups = -(-in_features // group)
    device = w.device  # the solve runs where its inputs are
    codes = torch.zeros(count, in_features, out_features, dtype=torch.uint8, device=device)  # (N, in, out)
    scales = torch.zeros(count, num_groups, out_features, dtype=torch.float16, device=device)
    zeros = torch.zeros(count, num_groups, out_features, dtype=torch.int32, device=device)
    losses = torch.zeros(count, dtype=torch.float64, device=device)
    rows = count * out_features
    scale = zero = torch.empty(0, device=device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        block = w[:, :, i1:i2].transpose(1, 2).contiguous()  # (N, B, out): each column contiguous
        errors = torch.zeros_like(block)  # (N, B, out)
        u_block = upper[:, i1:i2, i1:i2]  # (N, B, B)
        u_diag = torch.diagonal(u_block, dim1=1, dim2=2)  # (N, B)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                end = min(col + group, in_features)
                span = block[:, i : i + end - col].transpose(1, 2)  # (N, out, <= group)
                if end > i2:
                    span = torch.cat([span, w[:, :, i2:end]], dim=2)
                scale, zero = grid_params(span.reshape(rows, -1), spec.bits, spec.sym)  # (N*out,)
                scales[:, col // group] = scale.view(count, out_features).half()
                zeros[:, col // group] = zero.view(count, out_features).to(torch.int32)
            column = block[:, i].reshape(rows)  # (N*out,)
            q = quantize_codes(column[:, None], scale, zero, spec.bits)[:, 0]
            codes[:, col] = q.view(count, out_features).to(torch.uint8)
            residual = (column - scale * (q - zero)).view(count, out_features)  # (N, out)
            d = u_diag[:, i]  # (N,)
            err = residual / d[:, None]
            losses += (residual.double() ** 2).sum(dim=1) / (2 * d.double() ** 2)
            # the rounding error propagates to the block's later columns: block[:, j] -= U[i, j] err
            block[:, i:].addcmul_(u_block[:, i, i:, None], err[:, None, :], value=-1.0)
            errors[:, i] = err
        if i2 < in_features:
            w[:, :, i2:] -= torch.bmm(errors.transpose(1, 2), upper[:, i1:i2, i2:])

    codes = codes.transpose(1, 2)  # (N, out, in)
    sequential = (torch.arange(in_features, device=device) // group).to(torch.int32)  # (in,) g_idx without act-order
    results = []
    for n in range(count):
        g_idx = sequential
        item_codes, item_scales, item_zeros = codes[n], scales[n], zeros[n]
        if perm is not None:
            inverse = torch.argsort(perm[n])
            item_codes = item_codes[:, inverse]
            if group_order is None:  # act-order: groups in visiting order, recorded in g_idx
                g_idx = g_idx[inverse].contiguous()
            else:  # group-aware: visiting group k is the original group group_order[k]; g_idx stays i // group
                item_scales = torch.empty_like(item_scales).index_copy_(0, group_order[n], item_scales)
                item_zeros = torch.empty_like(item_zeros).index_copy_(0, group_order[n], item_zeros)
        quantized = QuantizedWeight(item_codes.contiguous(), item_scales.contiguous(), item_zeros.contiguous(), g_idx,
                                    spec.bits, group, spec.sym and spec.bits > 1)
        results.append(GPTQResult(quantized, float(damps[n]), float(losses[n])))
    return results


def group_aware_order(diag: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-aware reordering (GAR, Gafni et al., arXiv 2505.14638) of columns with Hessian diagonals diag (N, in).

    Each group of `group` consecutive columns stays together: inside a group, columns are
    visited by decreasing H_ii; groups are visited by decreasing max H_ii (a shorter last
    group always comes last, so every group starts at a multiple of `group` in visiting
    order). Returns the visiting order (N, in) and the original group of each visited group
    (N, G). Most of act-order's benefit, while g_idx stays i // group (no reordering at load).
    """
    count, in_features = diag.shape
    full = in_features // group
    head = diag[:, : full * group].reshape(count, full, group)  # (N, F, group)
    offsets = torch.arange(full, device=diag.device) * group  # (F,) first column of each group
    within = torch.argsort(head, dim=2, descending=True, stable=True) + offsets[None, :, None]
    by_max = torch.argsort(head.amax(dim=2), dim=1, descending=True, stable=True)  # (N, F)
    order = within.gather(1, by_max[:, :, None].expand(-1, -1, group)).reshape(count, full * group)
    groups = by_max
    if full * group < in_features:  # the shorter last group
        tail = torch.argsort(diag[:, full * group :], dim=1, descending=True, stable=True) + full * group
        order = torch.cat([order, tail], dim=1)
        groups = torch.cat([groups, torch.full((count, 1), full, dtype=groups.dtype, device=diag.device)], dim=1)
    return order, groups


def _inverse_cholesky_upper(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factors of (H + damp * mean(diag H) * I)^-1 for h (N, in, in), raising damp per map until it exists.

    With J the reversal permutation and J H J = R R^T (R lower), H^-1 = (J R^-1 J)^T (J R^-1 J)
    and J R^-1 J is upper triangular with a positive diagonal: the factor, from one Cholesky
    factorisation and one triangular inverse (no explicit inverse of H).
    """
    count, size, _ = h.shape
    mean_diag = torch.diagonal(h, dim1=1, dim2=2).mean(dim=1)  # (N,)
    eye = torch.eye(size, dtype=h.dtype, device=h.device)
    damps = torch.full((count,), float(damp), dtype=torch.float64, device=h.device)
    upper = torch.empty_like(h)
    pending = torch.arange(count, device=h.device)
    for _ in range(MAX_DAMP_TRIES):
        shift = (damps[pending] * mean_diag[pending].double()).to(h.dtype)  # (P,)
        lower, info = torch.linalg.cholesky_ex((h[pending] + shift[:, None, None] * eye).flip(-1, -2))
        ok = info == 0
        if bool(ok.any()):
            inverse = torch.linalg.solve_triangular(lower[ok], eye.expand(int(ok.sum()), -1, -1), upper=False)
            factor = inverse.flip(-1, -2)  # (P_ok, in, in) upper triangular
            good = torch.isfinite(factor).flatten(1).all(dim=1) & (torch.diagonal(factor, dim1=1, dim2=2) > 0).all(dim=1)
            done = pending[ok][good]
            upper[done] = factor[good]
            ok[ok.clone()] = good
        pending = pending[~ok]
        if len(pending) == 0:
            return upper, damps
        damps[pending] = torch.where(damps[pending] >= 0.01, damps[pending] * 2, damps[pending] + 0.01)
    raise RuntimeError(f"GPTQ: the Hessian is not positive definite even with damping {float(damps.max()):.3g}")
