"""Run the ``scale`` suite without any fixture and store it like `python -m benchmarks.run` does.

    python -m benchmarks.scale                    # the full suite (hours on a laptop CPU)
    python -m benchmarks.scale --quick            # 1- and 2-layer checkpoints: a smoke run
    python -m benchmarks.scale --commands calibrate "prune frequency"
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness.context import Protocol
from benchmarks.harness.report import RESULTS_DIR, RESULTS_MD, environment, save_suite, write_results
from benchmarks.harness.suites import load_suite_modules


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1- and 2-layer checkpoints only (smoke run)")
    parser.add_argument("--commands", nargs="+", default=None, help="command labels (default: every enabled one)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where raw JSON goes")
    parser.add_argument("--output", type=Path, default=RESULTS_MD, help="Markdown results file")
    args = parser.parse_args(argv)
    entry = load_suite_modules()["scale"]
    options: dict[str, object] = {"scale_commands": args.commands or []}
    if args.quick:
        options["scale_quick"] = True  # otherwise MOECOMPRESS_SCALE_QUICK decides
    started = time.perf_counter()
    data = entry.fn([], options)
    payload = {"suite": "scale", "title": entry.title, "environment": environment(),
               "protocol": Protocol().as_dict(), "fixtures": {}, "seconds": time.perf_counter() - started,
               "data": data}
    path = save_suite("scale", payload, args.results_dir)
    print(f"[bench] scale: {payload['seconds'] / 60:.1f} min -> {path}", flush=True)
    print(f"[bench] wrote {write_results(args.results_dir, args.output)}", flush=True)


if __name__ == "__main__":
    main()
