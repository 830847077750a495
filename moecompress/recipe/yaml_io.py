"""Read recipe YAML with the line of every key and item, and write plain YAML back.

`read_yaml(text)` returns the data and a `Positions` map from a location in the document
(a tuple such as ("steps", 2, "ratio")) to its 1-based line, so validation errors can name
the line they are about. Duplicate keys, which YAML parsers usually accept silently (the last
one wins), are refused: in a recipe they are always a mistake.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Location = tuple[str | int, ...]


@dataclass
class Positions:
    """Line numbers (1-based) of the keys and list items of one YAML document."""

    lines: dict[Location, int] = field(default_factory=dict)

    def line(self, location: Location) -> int | None:
        """The line of `location`, or of its nearest ancestor that has one."""
        for end in range(len(location), 0, -1):
            found = self.lines.get(tuple(location[:end]))
            if found is not None:
                return found
        return None


class YamlError(ValueError):
    """The text is not YAML, or not a mapping, or repeats a key; `line` and `location` say where."""

    def __init__(self, message: str, line: int | None = None, location: Location = ()) -> None:
        super().__init__(message)
        self.line = line
        self.location = location


def _walk(node: yaml.Node, location: Location, positions: Positions) -> None:
    """Record the line of every key / item under `node`; refuse repeated keys."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise YamlError(f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one",
                                line, location + (key,))
            seen[key] = line
            positions.lines[location + (key,)] = line
            _walk(value_node, location + (key,), positions)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            positions.lines[location + (index,)] = item.start_mark.line + 1
            _walk(item, location + (index,), positions)


def read_yaml(text: str) -> tuple[Any, Positions]:
    """Parse one YAML document (safe loader) and the positions of its keys and items."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            problem = err.problem or err.context or "invalid YAML"
            raise YamlError(f"not valid YAML: {problem}", mark.line + 1 if mark else None) from None
        except yaml.YAMLError as err:
            raise YamlError(f"not valid YAML: {err}") from None
        if node is None:
            return None, Positions()
        positions = Positions()
        _walk(node, (), positions)
        try:
            data = loader.construct_document(node)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            raise YamlError(f"not valid YAML: {err.problem or err.context}", mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()
    return data, positions


def parse_scalar(text: str) -> Any:
    """A `--set` value as YAML reads it: 0.25 -> float, true -> bool, [2, 3] -> list, null -> None."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def dump_yaml(data: Any) -> str:
    """Block-style YAML with keys in their given order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
