"""Costs of moecompress commands at the real layer shapes of public MoE models.

Random-weight checkpoints with a published model's config but only a few decoder layers
(`checkpoints.py`, shapes from `specs.py`) are run through the CLI in a child process under a
hard cgroup-v1 memory cap (`cgroup.py`); the ``scale`` suite (`suite.py`) times each command
(`commands.py`) at several depths, fits seconds per layer and the time-size exponent
(`fit.py`) and finds the smallest cap, as a fraction of the checkpoint, that each command
fits in.

    python -m benchmarks.run --suite scale --fixtures example   # the harness needs one fixture name
    python -m benchmarks.scale [--quick] [--spec NAME]           # the same suite, no fixtures at all
"""
