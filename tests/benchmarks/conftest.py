"""Shared fixtures of the benchmark-suite tests: one miniature trained fixture per session.

Each suite module under `benchmarks/harness/` gets a test that runs its suite on this
miniature (a 2-layer, 4-expert Qwen3-MoE trained for a few steps on a tiny corpus) with a
tiny protocol, so the suites cannot rot without CI noticing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fixtures import paths
from benchmarks.fixtures.build import build_fixture
from benchmarks.fixtures.corpus import CorpusSpec, build_corpus
from benchmarks.fixtures.specs import MINI
from benchmarks.harness.context import Fixture, Protocol

TINY_CORPUS = CorpusSpec(train_chars=20_000, eval_chars=3_000)
TINY_PROTOCOL = Protocol(seq_len=32, windows=2, calib_windows=2, batch_size=2)


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixtures cache holding the tiny corpus and the trained `mini` fixture."""
    root = tmp_path_factory.mktemp("bench-fixtures")
    build_corpus(paths.corpus_dir(root), TINY_CORPUS)
    build_fixture(MINI, root=root, corpus_spec=TINY_CORPUS, progress=False)
    return root


@pytest.fixture()
def mini_fixture(mini_root: Path) -> Fixture:
    """A fresh harness `Fixture` over the miniature (its lazily loaded model is not shared between tests)."""
    return Fixture(name="mini", folder=paths.model_dir("mini", mini_root), corpus=paths.corpus_dir(mini_root),
                   protocol=TINY_PROTOCOL)
