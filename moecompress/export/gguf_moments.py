"""Input second moments for GGUF type errors, held in the smaller of two exact forms.

Both sensitivity measures (`gguf_sensitivity`, `gguf_fisher`) need, per linear, the quadratic
forms D_r H D_r^T of a weight error D (R, in) with the weighted second moment of its inputs

    H = sum_t c_t x_t x_t^T = G^T G,    G = [sqrt(c_t) x_t]_t  (n, in)

As an (in, in) float64 matrix H is 8 in^2 bytes whatever the data: 2 GiB for DeepSeek-V3's
o_proj (in = 16384) and 2.5 GiB for its dense down_proj (in = 18432), all of a layer's linears
at once. Calibration rarely has more tokens than a linear is wide, and a routed expert sees
about T k / E of them (192 of 6144 at DeepSeek-V3's 256 experts, top-8), so `InputMoment`
keeps the rows G (float64, 8 n in bytes) while n <= in, and

    D_r H D_r^T = ||G D_r^T||^2

which is the same number in the same precision; past `in` rows it folds them into H (float64)
and goes on accumulating there. Either way memory is 8 in min(n, in) bytes, and the forms are computed a
block of `ROW_BLOCK` rows of D at a time, so their temporaries stay at a block's size.
"""

from __future__ import annotations

import numpy as np
import torch

ROW_BLOCK = 1024  # rows of D per product


def moment_bytes(width: int, rows: int) -> int:
    """Bytes an `InputMoment` of `width` holds after `rows` inputs: float64 rows, or the float64 matrix past `width`."""
    return 8 * width * min(rows, width)


class InputMoment:
    """H = sum_t c_t x_t x_t^T (in, in) of one map's inputs, as the rows sqrt(c_t) x_t or as H (module docstring)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._rows: list[torch.Tensor] = []  # (n_i, in) float64 blocks of G
        self._count = 0
        self._matrix: torch.Tensor | None = None  # (in, in) float64 once the rows outgrow it
        self._host: np.ndarray | None = None  # G (n, in) or H (in, in) on the host, for the forms

    @property
    def count(self) -> int:
        """Inputs added so far."""
        return self._count

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Inputs x (..., in), each weighted by c_t = `weight` (...,) (default 1)."""
        flat = x.detach().reshape(-1, self.width).double()  # (N, in)
        if weight is not None:
            flat = flat * weight.detach().double().reshape(-1, 1).sqrt()
        self._count += flat.shape[0]
        self._host = None
        if self._matrix is None and self._count <= self.width:
            self._rows.append(flat)
            return
        if self._matrix is None:
            self._matrix = torch.zeros(self.width, self.width, dtype=torch.float64, device=flat.device)
            for block in self._rows:
                self._matrix.addmm_(block.T, block)
            self._rows = []
        self._matrix.addmm_(flat.T, flat)

    def matrix(self) -> torch.Tensor:
        """H itself (in, in) float64 (built from the rows when they are held; for tests and small widths)."""
        if self._matrix is not None:
            return self._matrix
        out = torch.zeros(self.width, self.width, dtype=torch.float64)
        for block in self._rows:
            block = block.cpu()
            out.addmm_(block.T, block)
        return out

    def _on_host(self) -> np.ndarray:
        if self._host is None:
            if self._matrix is not None:
                self._host = self._matrix.cpu().numpy()
            elif self._rows:
                self._host = torch.cat([block.cpu() for block in self._rows]).numpy()  # (n, in) float64
            else:
                self._host = np.zeros((0, self.width), dtype=np.float64)
        return self._host

    def row_forms(self, delta: np.ndarray) -> np.ndarray:
        """D_r H D_r^T for every row r of delta (R, in), float64 (R,)."""
        delta = delta.reshape(-1, self.width)
        held = self._on_host()
        out = np.empty(delta.shape[0], dtype=np.float64)
        for start in range(0, delta.shape[0], ROW_BLOCK):
            block = delta[start : start + ROW_BLOCK].astype(np.float64)  # (b, in)
            if self._matrix is not None:
                out[start : start + ROW_BLOCK] = ((block @ held) * block).sum(1)
            else:
                projected = block @ held.T  # (b, n): D_r x_t sqrt(c_t)
                out[start : start + ROW_BLOCK] = np.square(projected).sum(1)
        return out

    def trace(self, delta: np.ndarray) -> float:
        """tr(D H D^T) for D = delta (R, in)."""
        return float(self.row_forms(delta).sum())
