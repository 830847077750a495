"""Method parameters given as text: `--param key=value` on the command line, `param: [key=value]` in recipes."""

from __future__ import annotations

import json
from typing import Any


def parse_key_value(item: str) -> tuple[str, Any]:
    """'key=value' -> (key, value), the value read as JSON when it is JSON and kept as text otherwise.

    Shared by `--param` and the recipe's `param` list; ValueError when there is no non-empty key
    before an "=" (each caller words its own error).
    """
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(item)
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw
