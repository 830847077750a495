"""`--set KEY=VALUE`: change one value of a recipe from the command line before it is validated.

KEY is a dotted path into the document: `steps.1.ratio` (or `steps[1].ratio`), `model`,
`calibration.samples`. A step may also be named by its op when the recipe has exactly one
step with that op: `steps.prune.ratio`. VALUE is read as YAML (`0.25`, `true`, `null`,
`[2, 3]`, `{code: data/code.jsonl}`); paths given this way are relative to the current
directory, not to the recipe file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from moecompress.errors import MoecompressError
from moecompress.recipe.errors import format_location
from moecompress.recipe.yaml_io import Location, parse_scalar

KEY_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class Override:
    """One `--set`: where (`location`, op names already turned into indices) and the new value."""

    text: str
    location: Location
    value: Any

    def covers(self, location: Location) -> bool:
        """Whether this override set `location` (or a section that contains it)."""
        return tuple(location[: len(self.location)]) == self.location


def parse_key(key: str) -> list[str | int]:
    """"steps[1].ratio" / "steps.1.ratio" -> ["steps", 1, "ratio"]."""
    parts: list[str | int] = []
    for raw in re.sub(r"\[(\d+)\]", r".\1", key).split("."):
        if raw.isdigit():
            parts.append(int(raw))
        elif KEY_PART.match(raw):
            parts.append(raw)
        else:
            raise MoecompressError(f"--set {key!r}: {raw!r} is not a key; write e.g. steps.1.ratio=0.25")
    return parts


def _step_index(steps: list[Any], op: str, text: str) -> int:
    matches = [i for i, step in enumerate(steps) if isinstance(step, dict) and step.get("op") == op]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise MoecompressError(f"--set {text!r}: the recipe has no {op} step; name the step by its index, e.g. steps.0")
    listed = ", ".join(f"steps[{i}]" for i in matches)
    raise MoecompressError(f"--set {text!r}: the recipe has {len(matches)} {op} steps ({listed}); use the index")


def apply_override(data: dict[str, Any], text: str) -> Override:
    """Apply one `KEY=VALUE` to `data` in place; return what it set."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise MoecompressError(f"--set {text!r} must look like KEY=VALUE, e.g. --set steps.1.ratio=0.25")
    parts = parse_key(key.strip())
    value = parse_scalar(raw)
    node: Any = data
    location: list[str | int] = []
    for position, part in enumerate(parts):
        last = position == len(parts) - 1
        if isinstance(node, list):
            if isinstance(part, str):
                if location != ["steps"]:
                    raise MoecompressError(f"--set {text!r}: {format_location(tuple(location))} is a list; "
                                           "use an index")
                part = _step_index(node, part, text)
            if not 0 <= part < len(node):
                raise MoecompressError(f"--set {text!r}: {format_location(tuple(location))} has {len(node)} "
                                       f"item(s), so the index must be below {len(node)}")
        elif isinstance(node, dict):
            if isinstance(part, int):
                raise MoecompressError(f"--set {text!r}: {format_location(tuple(location)) or 'the recipe'} is a "
                                       f"section, not a list; use a key instead of {part}")
            if not last and not isinstance(node.get(part), (dict, list)):
                if node.get(part) is not None:
                    raise MoecompressError(f"--set {text!r}: {format_location(tuple(location + [part]))} is a value, "
                                           "not a section")
                node[part] = {}
        else:
            raise MoecompressError(f"--set {text!r}: {format_location(tuple(location))} is a value, not a section")
        location.append(part)
        if last:
            node[part] = value
        else:
            node = node[part]
    return Override(text, tuple(location), value)


def apply_overrides(data: dict[str, Any], texts: list[str] | tuple[str, ...]) -> list[Override]:
    """Apply every `--set` in order (a later one wins)."""
    return [apply_override(data, text) for text in texts]
