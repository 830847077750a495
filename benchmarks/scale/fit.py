"""Small fits of the ``scale`` suite: seconds per decoder layer, and the exponent of time ~ size^b."""

from __future__ import annotations

import math
from collections.abc import Sequence


def seconds_per_layer(shallow: tuple[int, float], deep: tuple[int, float]) -> float:
    """(t(L) - t(L0)) / (L - L0) from two (layers, seconds) points."""
    (l0, t0), (l1, t1) = shallow, deep
    if l1 == l0:
        raise ValueError("the two depths must differ")
    return (t1 - t0) / (l1 - l0)


def extrapolate(shallow: tuple[int, float], per_layer: float, layers: int) -> float:
    """Time at `layers` decoder layers: t(L0) + (layers - L0) * per_layer."""
    l0, t0 = shallow
    return t0 + (layers - l0) * per_layer


def power_law_exponent(sizes: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of log t = a + b log s; returns (b, r^2). Needs two distinct positive sizes."""
    if len(sizes) != len(times) or len(sizes) < 2:
        raise ValueError("need at least two (size, time) points")
    xs = [math.log(s) for s in sizes]
    ys = [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("sizes must not all be equal")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    residual = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    total = sum((y - my) ** 2 for y in ys)
    return b, (1.0 - residual / total) if total > 0 else 1.0
