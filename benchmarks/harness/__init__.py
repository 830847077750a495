"""Benchmark harness: fixtures, evaluation protocol, suites and the RESULTS.md report."""
