"""Imports run one way: cli -> recipe -> compose -> stages -> calibration -> engine/io -> models -> base.

Every `import moecompress.X` and `from moecompress.X import ...` in the package, at module top or
inside a function, is read from the source; a module may import its own package, a package of a
lower layer, or a package of its own layer that does not import it back (no circle).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "moecompress"

# layer of each top-level module or package of moecompress: higher layers may import lower ones
LAYERS: dict[str, int] = {
    "__main__": 8, "cli": 8,
    "recipe": 7,
    "compress": 6, "loader": 6, "__init__": 6,  # what composes stages: joint compression, moecompress.load
    "prune": 5, "quant": 5, "condense": 5, "evaluate": 5, "export": 5,  # the stages
    "calibration": 4,  # the pass every stage builds on
    "engine": 3, "io": 3,
    "models": 2, "sizes": 2,
    "errors": 1, "dtypes": 1, "unfinished": 1,
}


def _owner(path: Path) -> str:
    """The top-level module or package of moecompress a source file belongs to."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the files with such an import."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _owner(path)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "moecompress" and len(parts) > 1 and parts[1] != source:
                    edges[(source, parts[1])].append(str(path.relative_to(PACKAGE.parent)))
    return edges


def test_every_module_has_a_layer() -> None:
    owners = {_owner(path) for path in PACKAGE.rglob("*.py")}
    assert owners <= set(LAYERS), f"give these a layer in LAYERS: {sorted(owners - set(LAYERS))}"


def test_no_import_runs_up_the_layers_or_in_a_circle() -> None:
    edges = _imports()
    upward = [f"{a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]}) in {sorted(set(files))}"
              for (a, b), files in sorted(edges.items()) if LAYERS.get(b, 0) > LAYERS.get(a, 0)]
    circles = [f"{a} <-> {b}: {sorted(set(files))} and {sorted(set(edges[(b, a)]))}"
               for (a, b), files in sorted(edges.items()) if a < b and (b, a) in edges]
    assert not upward, "\n".join(upward)
    assert not circles, "\n".join(circles)
