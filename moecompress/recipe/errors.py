"""One-line recipe errors that name the place in the file: `recipe.yaml:14: steps[2].ratio: must be < 1`."""

from __future__ import annotations

from pathlib import Path

from moecompress.errors import MoecompressError
from moecompress.recipe.yaml_io import Location, Positions


def format_location(location: Location) -> str:
    """("steps", 2, "ratio") -> "steps[2].ratio"."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


class RecipeError(MoecompressError):
    """A problem in a recipe, at `location` in the document (and `line` of `file`, when known)."""

    def __init__(self, message: str, location: Location = (), line: int | None = None,
                 file: str | Path | None = None) -> None:
        self.message = " ".join(message.split())  # always one line
        self.location = tuple(location)
        self.line = line
        self.file = file
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.file == "--set":
            where = "--set "
        elif self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        path = format_location(self.location)
        return f"{where}{path + ': ' if path else ''}{self.message}"

    def placed(self, positions: Positions | None, file: str | Path | None) -> RecipeError:
        """The same error with the line of its location in `file` filled in."""
        line = self.line
        if line is None and positions is not None and self.location:
            line = positions.line(self.location)
        return RecipeError(self.message, self.location, line, file if file is not None else self.file)


def at(location: Location, message: str) -> RecipeError:
    """A `RecipeError` at `location` (line and file are added by the loader)."""
    return RecipeError(message, location)


def cli_flags_to_keys(message: str, keys: set[str] | list[str]) -> str:
    """Library messages name CLI flags (`--bits`); in a recipe they are keys (`bits`)."""
    for key in sorted(keys, key=len, reverse=True):
        message = message.replace(f"--{key.replace('_', '-')}", key)
    return message
