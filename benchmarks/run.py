"""Run benchmark suites on the trained fixtures and write benchmarks/RESULTS.md + raw JSON.

    python -m benchmarks.run                                 # every suite on every fixture
    python -m benchmarks.run --suite unpruned --fixtures example
    python -m benchmarks.run --list

Fixtures come from the cache built by `python -m benchmarks.fixtures.build`. Each suite's raw
results go to benchmarks/results/<suite>.json, with the machine, versions, date and protocol;
RESULTS.md is re-rendered from all stored results.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py` as well as `python -m benchmarks.run`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.context import Protocol, load_fixtures  # noqa: E402
from benchmarks.harness.report import RESULTS_DIR, RESULTS_MD, environment, save_suite, write_results  # noqa: E402
from benchmarks.harness.suites import load_suite_modules  # noqa: E402

SUITES = load_suite_modules()

DEFAULT_FIXTURES = ("example", "qwen3_moe", "deepseek_v3")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", nargs="+", choices=sorted(SUITES), help="suites to run (default: all)")
    parser.add_argument("--fixtures", nargs="+", default=list(DEFAULT_FIXTURES), help="fixture names")
    parser.add_argument("--root", type=Path, default=None, help="fixtures cache (default $MOECOMPRESS_FIXTURES)")
    parser.add_argument("--windows", type=int, default=Protocol.windows, help="test windows per domain")
    parser.add_argument("--seq-len", type=int, default=Protocol.seq_len, help="tokens per window")
    parser.add_argument("--calib-windows", type=int, default=Protocol.calib_windows,
                        help="validation windows per domain for calibration statistics")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the random baseline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where raw JSON goes")
    parser.add_argument("--output", type=Path, default=RESULTS_MD, help="Markdown results file")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, entry in sorted(SUITES.items()):
            print(f"{name}: {entry.title}")
        return

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per save/reload would drown the suites' own progress
    torch.set_num_threads(args.threads)
    protocol = Protocol(seq_len=args.seq_len, windows=args.windows, calib_windows=args.calib_windows)
    fixtures = load_fixtures(list(args.fixtures), protocol, args.root)
    options = {"seeds": tuple(args.seeds)}
    for name in args.suite or list(SUITES):
        entry = SUITES[name]
        print(f"[bench] {name}: {entry.title}", flush=True)
        started = time.perf_counter()
        data = entry.fn(fixtures, options)
        payload = {
            "suite": name,
            "title": entry.title,
            "environment": environment(),
            "protocol": protocol.as_dict(),
            "fixtures": {f.name: {"path": str(f.folder), "model_type": f.record["spec"]["model_type"],
                                  "training": {k: f.record["training"][k] for k in ("steps", "seconds", "tokens")},
                                  "tokenizer_sha256": f.record["provenance"]["tokenizer"]["sha256"]}
                         for f in fixtures},
            "seconds": time.perf_counter() - started,
            "data": data,
        }
        path = save_suite(name, payload, args.results_dir)
        print(f"[bench] {name}: {payload['seconds'] / 60:.1f} min -> {path}", flush=True)
    target = write_results(args.results_dir, args.output)
    print(f"[bench] wrote {target}", flush=True)


if __name__ == "__main__":
    main()
