"""The pruning methods' names, read without importing torch.

Each scorer lives in its own module of `moecompress/prune/scorers/`, named after the method it
registers (a test keeps the two in step). Recipe validation checks method names against this
list so that a misspelt method fails in well under a second, before the registry (and torch)
is imported.
"""

from __future__ import annotations

from pathlib import Path

SCORERS_DIR = Path(__file__).resolve().parent / "scorers"

# `prune`'s method when none is given: the expert method with the lowest mean perplexity increase at 50% of routed
# experts removed over the fixtures (benchmarks/RESULTS.md, pruning methods); HEAPr does better on two of them but
# removes neurons rather than experts (and writes its plan through the whole model)
DEFAULT_PRUNE_METHOD = "easy_ep"


def scorer_names() -> list[str]:
    """Registered pruning-method names, from the scorer modules' file names."""
    return sorted(path.stem for path in SCORERS_DIR.glob("*.py") if not path.stem.startswith("_"))


def check_scorer_name(name: str) -> None:
    """A one-line `MoecompressError` (the registry's wording) when `name` is not a pruning method."""
    from moecompress.errors import MoecompressError

    names = scorer_names()
    if name not in names:
        raise MoecompressError(f"unknown pruning method {name!r}; available: {', '.join(names)}")
