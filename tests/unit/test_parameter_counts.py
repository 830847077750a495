"""No function outside the CLI takes more than 8 parameters (a stage takes one request instead).

The functions below still take more; each is listed with its count, which may only fall. The
test fails when a new function exceeds the limit, when a listed one grows, and when a listed
one is fixed but still listed (so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "moecompress"
LIMIT = 8
# (file relative to the package, function) -> its parameter count today
NOT_YET: dict[tuple[str, str], int] = {}


def _counts() -> dict[tuple[str, str], int]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
                if args.args and args.args[0].arg in ("self", "cls"):
                    count -= 1
                if count > LIMIT:
                    found[(relative.as_posix(), node.name)] = max(count, found.get((relative.as_posix(), node.name), 0))
    return found


def test_no_new_function_takes_more_than_eight_parameters() -> None:
    found = _counts()
    new = {key: count for key, count in found.items() if key not in NOT_YET}
    assert not new, f"functions with more than {LIMIT} parameters (group them in a request or dataclass): {new}"
    grown = {key: count for key, count in found.items() if key in NOT_YET and count > NOT_YET[key]}
    assert not grown, f"listed functions that took on parameters: {grown}"
    fixed = sorted(key for key in NOT_YET if key not in found)
    assert not fixed, f"these now take at most {LIMIT} parameters: remove them from NOT_YET: {fixed}"
