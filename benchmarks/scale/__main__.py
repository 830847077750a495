"""Run the ``scale`` suite without any fixture and store it like `python -m benchmarks.run` does.

    python -m benchmarks.scale                    # the full suite (hours on a laptop CPU)
    python -m benchmarks.scale --quick            # 1- and 2-layer checkpoints: a smoke run
    python -m benchmarks.scale --commands calibrate "prune frequency"
    python -m benchmarks.scale --merge --commands "quantize 2.5 bits"   # keep the stored rows of the others
    python -m benchmarks.scale --spec deepseek_v3_fp8   # DeepSeek-V3 as published (FP8 blocks), 2 and 3 layers

The default spec (Qwen3-30B-A3B) is stored as benchmarks/results/scale.json; any other spec as
scale-<spec>.json (scale-deepseek-v3-fp8.json), its own section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness.context import Protocol
from benchmarks.harness.report import RESULTS_DIR, RESULTS_MD, environment, save_suite, write_results
from benchmarks.scale.specs import SPECS
from benchmarks.scale.checkpoints import scale_root
from benchmarks.scale.snapshot import tree_digest
from benchmarks.scale.suite import (DEFAULT_SPEC, SPEC_ENV, measure, merge_runs, recover, result_key, settings,
                                    suite_title)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", choices=sorted(SPECS), default=None,
                        help=f"model whose layer shapes to build (default ${SPEC_ENV}, else {DEFAULT_SPEC}); "
                             "deepseek_v3_fp8 is DeepSeek-V3 as published, FP8 weights in 128x128 blocks")
    parser.add_argument("--quick", action="store_true", help="1- and 2-layer checkpoints only (smoke run)")
    parser.add_argument("--commands", nargs="+", default=None,
                        help="command labels (default: the spec's, else every enabled one)")
    parser.add_argument("--timing-depths", type=int, nargs="+", default=None,
                        help="uncapped timing depths for every command (default: the suite's, and the slow commands' "
                             "own)")
    parser.add_argument("--recover", type=Path, default=None, metavar="FROZEN_CODE_DIR",
                        help="do not measure: rebuild the data of a run that was stopped from the progress records "
                             "($MOECOMPRESS_SCALE_DIR/progress.jsonl) and the frozen package copy it measured")
    parser.add_argument("--recover-commit", default=None, help="with --recover: the commit that copy was made from")
    parser.add_argument("--recover-source", choices=("head", "worktree"), default="head",
                        help="with --recover: whether that copy was the commit or a working tree")
    parser.add_argument("--merge", action="store_true",
                        help="keep the stored rows of the commands this run does not measure (each says its run)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where raw JSON goes")
    parser.add_argument("--output", type=Path, default=RESULTS_MD, help="Markdown results file")
    args = parser.parse_args(argv)
    options: dict[str, object] = {"scale_commands": args.commands or []}
    if args.spec:
        options["scale_spec"] = args.spec  # otherwise MOECOMPRESS_SCALE_SPEC decides
    if args.quick:
        options["scale_quick"] = True  # otherwise MOECOMPRESS_SCALE_QUICK decides
    if args.timing_depths:
        options["scale_timing_depths"] = tuple(args.timing_depths)
    chosen = settings(options)
    key = result_key(chosen.spec)
    started = time.perf_counter()
    if args.recover is not None:
        records = [json.loads(line) for line in (scale_root() / "progress.jsonl").read_text().splitlines() if line]
        code = {"source": args.recover_source, "commit": args.recover_commit, "path": str(args.recover),
                "worktree_differs_from_head": None, "sha256": tree_digest(args.recover / "moecompress")}
        data = recover(chosen, records, code if args.recover_commit else None)
        seconds = sum(row["seconds"] for row in data["timings"])  # the measured runs, not this recovery
        seconds += sum(a["seconds"] for cap in data["caps"] for a in cap["attempts"])
    else:
        data = measure(chosen)
        seconds = time.perf_counter() - started
    stored = args.results_dir / f"{key}.json"
    if args.merge and stored.exists():
        data = merge_runs(json.loads(stored.read_text()), data)
    payload = {"suite": key, "title": suite_title(chosen.spec), "environment": environment(),
               "protocol": Protocol().as_dict(), "fixtures": {}, "seconds": seconds, "data": data}
    path = save_suite(key, payload, args.results_dir)
    print(f"[bench] {key}: {payload['seconds'] / 60:.1f} min -> {path}", flush=True)
    print(f"[bench] wrote {write_results(args.results_dir, args.output)}", flush=True)


if __name__ == "__main__":
    main()
