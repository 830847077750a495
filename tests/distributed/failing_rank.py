"""`python -m tests.distributed.failing_rank ARGS`: `moecompress ARGS`, with one rank made to fail.

The rank named by ``MOECOMPRESS_TEST_FAIL_RANK`` (default 1) raises while it runs decoder
layer 1 of the calibration pass; every other rank runs normally. Used by the distributed
tests to check that a failure on one rank ends every rank, with no output written.
"""

from __future__ import annotations

import os

from moecompress.engine.layers import LayerEngine
from moecompress.errors import MoecompressError

FAILURE = "injected failure in decoder layer 1"


def _install() -> None:
    if os.environ.get("RANK", "0") != os.environ.get("MOECOMPRESS_TEST_FAIL_RANK", "1"):
        return
    original = LayerEngine.run_layer

    def run_layer(self, index, before_batch=None):
        if index == 1:
            raise MoecompressError(FAILURE)
        return original(self, index, before_batch)

    LayerEngine.run_layer = run_layer


if __name__ == "__main__":
    from moecompress.cli.app import main

    _install()
    main()
