"""The torch-free list of pruning-method names matches the scorer registry."""

from __future__ import annotations

import pytest

from moecompress.errors import MoecompressError
from moecompress.prune.scorer_names import check_scorer_name, scorer_names
from moecompress.prune.scorers import available_scorers


def test_module_names_are_the_registered_names() -> None:
    assert scorer_names() == sorted(available_scorers())


def test_unknown_name_lists_the_methods() -> None:
    check_scorer_name("reap")
    with pytest.raises(MoecompressError, match="unknown pruning method 'reapp'; available: ean, ean_sum, easy_ep"):
        check_scorer_name("reapp")


def test_dtype_names_match_the_loader() -> None:
    from moecompress.dtypes import DTYPE_ALIASES
    from moecompress.models.load import DTYPES

    assert set(DTYPE_ALIASES) == set(DTYPES)
