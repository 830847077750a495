"""Solve time of the bit-allocation programs on synthetic costs (target: "solves in seconds").

    python -m benchmarks.quant.lp_solve_time [--layers 48] [--experts 128] [--json-out FILE]

Synthetic MC-MoE-shaped costs: per expert a log-normal selection frequency f and routing
weight w, a log-normal sensitivity s, and block-output errors L_b = s * 4^-b * (1 + noise)
(each extra bit quarters the error); cost = f * w^1.5 * L_b. Sizes are params x bits with
equal-sized experts. Programs timed (wall clock, program construction included):

* global MC-MoE/GEMQ program, widths {1, 2, 3, 4}, average 2.5 bits, one expert per layer at
  4 bits: 48 x 128 x 4 = 24,576 binaries;
* the same with widths {2, 3, 4};
* per-layer programs (MC-MoE), widths {2, 3, 4};
* the joint program, choices {drop, 2, 3, 4}, average 2.0 bits (forces drops);

each with HiGHS and with CBC (60 s limit: a CBC that hits it reports "feasible").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moecompress.quant.allocate import DROP, AllocationRules, PruneRules, SolverOptions, allocate


def synthetic_costs(layers: int, experts: int, widths: list[int], seed: int = 0) -> tuple[dict, dict]:
    """(costs, sizes) per layer, each (E, C), shaped like MC-MoE's costs."""
    gen = torch.Generator().manual_seed(seed)
    costs, sizes = {}, {}
    params = 3 * 2048 * 768  # one Qwen3-30B-A3B expert
    for layer in range(layers):
        freq = torch.exp(0.8 * torch.randn(experts, generator=gen))
        freq = freq / freq.sum()
        weight = torch.exp(0.3 * torch.randn(experts, generator=gen))
        weight = weight / weight.sum()
        sensitivity = torch.exp(0.5 * torch.randn(experts, generator=gen)) * (1 + layer / layers)
        w = torch.tensor(widths, dtype=torch.float64)
        noise = 1 + 0.1 * torch.rand(experts, len(widths), generator=gen, dtype=torch.float64)
        error = sensitivity[:, None].double() * torch.where(w == 0, torch.full_like(w, 2.0), 4.0 ** (-w)) * noise
        costs[layer] = freq[:, None].double() * weight[:, None].double() ** 1.5 * error
        sizes[layer] = (params * w).expand(experts, -1).clone()
    return costs, sizes


def run(layers: int, experts: int, time_limit: float) -> list[dict]:
    """Time every program with both solvers; one record per (program, solver)."""
    params = 3 * 2048 * 768
    total = layers * experts * params
    cases = [
        ("global, widths 1-4", [1, 2, 3, 4], 2.5, "global", None),
        ("global, widths 2-4", [2, 3, 4], 2.5, "global", None),
        ("per-layer, widths 2-4", [2, 3, 4], 2.5, "layer", None),
        ("joint drop/2/3/4", [DROP, 2, 3, 4], 2.0, "global", PruneRules(feasible_kept=tuple(range(8, experts + 1)))),
    ]
    records = []
    for name, widths, bits, scope, prune in cases:
        costs, sizes = synthetic_costs(layers, experts, widths)
        for solver in ("highs", "cbc"):
            started = time.perf_counter()
            result = allocate(costs, sizes, widths, bits * total,
                              rules=AllocationRules(scope=scope, prune=prune, require_top=1),
                              solving=SolverOptions(time_limit=time_limit, name=solver))
            seconds = time.perf_counter() - started
            average = result.size / total
            records.append({"program": name, "solver": solver, "variables": result.variables,
                            "status": result.status, "gap": result.gap, "seconds": round(seconds, 2),
                            "average_bits": round(average, 4), "objective": result.objective})
            print(f"{name:24s} {solver:6s} vars={result.variables:6d} {result.status:8s} "
                  f"gap={result.gap if result.gap is not None else '-'} {seconds:7.2f} s avg={average:.3f} bits")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    records = run(args.layers, args.experts, args.time_limit)
    if args.json_out:
        args.json_out.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
