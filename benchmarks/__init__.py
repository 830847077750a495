"""Benchmarks for moecompress: trained MoE fixtures and the harness that writes RESULTS.md."""
