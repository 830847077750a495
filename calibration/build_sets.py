"""Regenerate moecompress's shipped calibration sets from text already on this machine.

    python calibration/build_sets.py           # write calibration/ and moecompress/example/calibration/
    python calibration/build_sets.py --check   # rebuild in memory, exit 1 if the shipped files differ

Three domains, each a .jsonl file of {"text": ..., "source": ...} records (about 180 KB of
text each):

* code.jsonl   Python source of a fixed list of standard-library modules, cut losslessly into
               top-level chunks (module header, each function, each class).
* prose.jsonl  English technical prose: the help topics of the standard library's
               pydoc_data/topics.py (the language reference), in a fixed hash order.
* docs.jsonl   Project READMEs (Markdown/reStructuredText) from the METADATA of a fixed list of
               installed packages under permissive licences (MIT, BSD, ISC, Apache-2.0).

Everything is deterministic for a given Python version and set of package versions; the
versions used are written to MANIFEST.json. Licence texts are copied into licenses/. The
repository copy (calibration/) and the package copy (moecompress/example/calibration/) are
byte-identical; README.md is written by hand and copied to the package.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata as metadata
import json
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
PACKAGE_DIR = REPO_DIR.parent / "moecompress" / "example" / "calibration"
TARGET_BYTES = 180_000  # UTF-8 bytes of text per set

# Standard-library modules for code.jsonl, in order; at most CODE_BYTES_PER_MODULE from each.
CODE_MODULES = (
    "bisect", "heapq", "colorsys", "graphlib", "shlex", "string", "textwrap", "fractions",
    "statistics", "functools", "contextlib", "dataclasses", "difflib", "calendar", "pprint",
    "queue", "sched", "numbers", "operator", "tokenize", "enum", "argparse",
)  # fmt: skip
CODE_BYTES_PER_MODULE = 11_000
PROSE_MAX_TOPIC_BYTES = 16_000  # topics longer than this are skipped to keep the set varied

# Packages for docs.jsonl and the licence each must declare (checked against its metadata).
DOCS_PACKAGES = {
    "accelerate": "Apache-2.0",
    "annotated-types": "MIT",
    "anyio": "MIT",
    "click": "BSD-3-Clause",
    "datasets": "Apache-2.0",
    "dill": "BSD-3-Clause",
    "fsspec": "BSD-3-Clause",
    "h11": "MIT",
    "highspy": "MIT",
    "huggingface_hub": "Apache-2.0",
    "idna": "BSD-3-Clause",
    "markdown-it-py": "MIT",
    "mpmath": "BSD-3-Clause",
    "networkx": "BSD-3-Clause",
    "pandas": "BSD-3-Clause",
    "pluggy": "MIT",
    "psutil": "BSD-3-Clause",
    "PuLP": "MIT",
    "pydantic": "MIT",
    "pytest": "MIT",
    "rich": "MIT",
    "shellingham": "ISC",
    "sympy": "BSD-3-Clause",
    "transformers": "Apache-2.0",
    "typer": "MIT",
    "xxhash": "BSD-2-Clause",
}
DOCS_BYTES_PER_PACKAGE = 9_000
# The words a package's metadata must contain for each expected licence.
LICENCE_EVIDENCE = {
    "MIT": ("MIT",),
    "ISC": ("ISC",),
    "BSD": ("BSD",),
    "BSD-2-Clause": ("BSD-2-Clause", "BSD"),
    "BSD-3-Clause": ("BSD-3-Clause", "BSD"),
    "Apache-2.0": ("Apache",),
}
HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
HTML_LINE = re.compile(r"^\s*</?[A-Za-z!]")  # raw HTML lines (logos, centred headers)
IMAGE_LINE = re.compile(r"!\[|\.svg\b|^\s*(\.\. image::|\.\. \|[^|]+\| image::|:target:|:alt:|:width:|:height:)")  # badges, images
RST_SUBSTITUTIONS_LINE = re.compile(r"^[\s|]*(\|[\w.-]+\|[\s|]*)+$")  # a row of |badge| substitutions


@dataclass
class Document:
    """One record of a set: its text and where it came from."""

    text: str
    source: str


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8."""
    return len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# code.jsonl


def _node_start(node: ast.stmt, lines: list[str]) -> int:
    """0-based first line of a top-level def/class: its first decorator, extended up over comments touching it."""
    start = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])]) - 1
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return start


def python_chunks(source: str) -> list[str]:
    """Cut a module into top-level chunks: each def/class (with decorators and comments above it)
    and each run of other statements. Joining the chunks gives back the file."""
    lines = source.splitlines(keepends=True)
    boundaries = [0]
    previous_was_block = False
    for node in ast.parse(source).body:
        is_block = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if is_block or previous_was_block:
            start = _node_start(node, lines) if is_block else node.lineno - 1
            if start > boundaries[-1]:
                boundaries.append(start)
        previous_was_block = is_block
    boundaries.append(len(lines))
    return ["".join(lines[a:b]) for a, b in zip(boundaries, boundaries[1:])]


def build_code() -> tuple[list[Document], dict]:
    """Chunks of CODE_MODULES, at most CODE_BYTES_PER_MODULE per module, whole chunks only, file order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents: list[Document] = []
    for module in CODE_MODULES:
        source = (stdlib / f"{module}.py").read_text(encoding="utf-8")
        budget = CODE_BYTES_PER_MODULE
        for chunk in python_chunks(source):
            text = chunk.strip("\n")
            if text and utf8_size(text) <= budget:
                documents.append(Document(text, f"Lib/{module}.py"))
                budget -= utf8_size(text)
    return documents, {"python": sys.version.split()[0], "modules": list(CODE_MODULES), "licence": "PSF-2.0"}


# ---------------------------------------------------------------------------------------------
# prose.jsonl


def build_prose() -> tuple[list[Document], dict]:
    """pydoc help topics in sha256-of-key order, whole topics up to TARGET_BYTES."""
    from pydoc_data.topics import topics

    documents: list[Document] = []
    used = 0
    for key in sorted(topics, key=lambda name: hashlib.sha256(name.encode()).hexdigest()):
        text = topics[key].strip()
        size = utf8_size(text)
        if size > PROSE_MAX_TOPIC_BYTES or used + size > TARGET_BYTES:
            continue
        documents.append(Document(text, f"pydoc_data/topics.py:{key}"))
        used += size
    return documents, {"python": sys.version.split()[0], "topics": [d.source.split(":", 1)[1] for d in documents], "licence": "PSF-2.0"}


# ---------------------------------------------------------------------------------------------
# docs.jsonl


def declared_licence(dist: metadata.Distribution) -> str:
    """Everything a distribution's metadata says about its licence, on one line."""
    fields = [dist.metadata.get("License-Expression") or "", (dist.metadata.get("License") or "").split("\n")[0]]
    fields += [c for c in dist.metadata.get_all("Classifier") or [] if c.startswith("License")]
    return " | ".join(field for field in fields if field)


def licence_files(dist: metadata.Distribution) -> list[Path]:
    """The distribution's top-level licence file(s) from its .dist-info folder."""
    found = []
    for file in dist.files or []:
        parts = Path(str(file)).parts
        if parts[0].endswith(".dist-info") and parts[-1].upper().startswith(("LICENSE", "LICENCE", "COPYING")):
            if len(parts) == 2 or (len(parts) == 3 and parts[1] == "licenses"):
                found.append(Path(str(dist.locate_file(file))))
    return sorted(found)


def clean_readme(text: str) -> str:
    """README body without HTML comments, raw HTML lines and badge/image lines, blank-line runs collapsed."""
    noise = (HTML_LINE.match, IMAGE_LINE.search, RST_SUBSTITUTIONS_LINE.match)
    lines = HTML_COMMENT.sub("", text.replace("\r\n", "\n")).split("\n")
    kept = [line.rstrip() for line in lines if not any(is_noise(line) for is_noise in noise)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()


def first_paragraphs(text: str, budget: int) -> str:
    """The longest run of leading paragraphs (blank-line separated) within `budget` bytes."""
    taken: list[str] = []
    used = 0
    for paragraph in text.split("\n\n"):
        size = utf8_size(paragraph) + 2
        if used + size > budget:
            break
        taken.append(paragraph)
        used += size
    return "\n\n".join(taken)


def build_docs() -> tuple[list[Document], dict, dict[str, list[Path]]]:
    """README text of DOCS_PACKAGES (licence checked), first DOCS_BYTES_PER_PACKAGE bytes of whole paragraphs each."""
    documents: list[Document] = []
    packages: dict[str, dict] = {}
    licences: dict[str, list[Path]] = {}
    for name, expected in DOCS_PACKAGES.items():
        dist = metadata.distribution(name)
        declared = declared_licence(dist)
        if not any(word in declared for word in LICENCE_EVIDENCE[expected]):
            raise SystemExit(f"{name}: expected licence {expected}, metadata says {declared!r}; update DOCS_PACKAGES")
        files = licence_files(dist)
        if not files:
            raise SystemExit(f"{name}: no licence file in its .dist-info; drop it from DOCS_PACKAGES")
        text = first_paragraphs(clean_readme(dist.metadata.get_payload() or ""), DOCS_BYTES_PER_PACKAGE)
        if not text:
            raise SystemExit(f"{name}: its METADATA has no README text; drop it from DOCS_PACKAGES")
        documents.append(Document(text, f"{name} {dist.version} README"))
        packages[name] = {"version": dist.version, "licence": expected, "declared": declared}
        licences[name] = files
    return documents, {"packages": packages}, licences


# ---------------------------------------------------------------------------------------------
# Output


def jsonl_bytes(documents: list[Document]) -> bytes:
    """The .jsonl file: one {"source", "text"} object per line, keys sorted, UTF-8."""
    lines = [json.dumps({"source": d.source, "text": d.text}, ensure_ascii=False, sort_keys=True) for d in documents]
    return ("\n".join(lines) + "\n").encode("utf-8")


def licence_outputs(package_licences: dict[str, list[Path]]) -> tuple[dict[str, bytes], dict[str, list[str]]]:
    """licenses/ files (identical texts stored once, named after the first package using them) and each package's files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    outputs = {"licenses/Python-PSF.txt": (stdlib / "LICENSE.txt").read_bytes()}
    by_content: dict[bytes, str] = {}
    per_package: dict[str, list[str]] = {}
    for name in sorted(package_licences, key=str.lower):
        for index, file in enumerate(package_licences[name]):
            content = file.read_bytes()
            if content not in by_content:
                suffix = "" if index == 0 else f"-{file.name}"
                by_content[content] = f"licenses/{name}{suffix}.txt"
                outputs[by_content[content]] = content
            per_package.setdefault(name, []).append(by_content[content])
    return outputs, per_package


def build_all() -> dict[str, bytes]:
    """Every generated file, relative path -> bytes."""
    code, code_info = build_code()
    prose, prose_info = build_prose()
    docs, docs_info, package_licences = build_docs()
    outputs: dict[str, bytes] = {}
    manifest: dict[str, dict] = {}
    for name, documents, info in (("code", code, code_info), ("prose", prose, prose_info), ("docs", docs, docs_info)):
        data = jsonl_bytes(documents)
        outputs[f"{name}.jsonl"] = data
        manifest[name] = {
            "file": f"{name}.jsonl",
            "documents": len(documents),
            "text_bytes": sum(utf8_size(d.text) for d in documents),
            "file_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            **info,
        }
    licence_files_out, per_package = licence_outputs(package_licences)
    outputs.update(licence_files_out)
    for name, files in per_package.items():
        manifest["docs"]["packages"][name]["licence_files"] = files
    manifest["code"]["licence_files"] = manifest["prose"]["licence_files"] = ["licenses/Python-PSF.txt"]
    outputs["MANIFEST.json"] = (json.dumps(manifest, indent=1, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    return outputs


def differences(outputs: dict[str, bytes], folder: Path) -> list[str]:
    """Generated files that are missing from `folder` or differ from it, plus stale files there."""
    wrong = [path for path, data in outputs.items() if not (folder / path).is_file() or (folder / path).read_bytes() != data]
    stale = [
        str(p.relative_to(folder))
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (p.suffix in (".jsonl", ".txt") or p.name == "MANIFEST.json") and str(p.relative_to(folder)) not in outputs
    ]
    return wrong + [f"{path} (stale)" for path in stale]


def write(outputs: dict[str, bytes], folder: Path) -> None:
    """Replace the generated files in `folder` (licenses/ is rewritten from scratch)."""
    shutil.rmtree(folder / "licenses", ignore_errors=True)
    for path, data in outputs.items():
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def main() -> int:
    """Write both copies, or with --check compare them with a fresh build."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare the shipped files with a fresh build; exit 1 on any difference")
    args = parser.parse_args()
    outputs = build_all()
    readme = (REPO_DIR / "README.md").read_bytes() if (REPO_DIR / "README.md").is_file() else None
    if args.check:
        package_outputs = dict(outputs, **({"README.md": readme} if readme is not None else {}))
        problems = [f"calibration/{p}" for p in differences(outputs, REPO_DIR)]
        problems += [f"moecompress/example/calibration/{p}" for p in differences(package_outputs, PACKAGE_DIR)]
        for problem in problems:
            print(f"differs: {problem}")
        print("calibration sets match a fresh build" if not problems else f"{len(problems)} file(s) differ")
        return 1 if problems else 0
    write(outputs, REPO_DIR)
    write(outputs, PACKAGE_DIR)
    if readme is not None:
        (PACKAGE_DIR / "README.md").write_bytes(readme)
    for path in ("code.jsonl", "prose.jsonl", "docs.jsonl"):
        print(f"{path}: {len(outputs[path]):,} bytes")
    print(f"total per copy: {sum(len(data) for data in outputs.values()):,} bytes in {len(outputs)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
