"""A frozen copy of the moecompress package for a long benchmark's child processes.

A full ``scale`` run takes hours; if the checkout changes meanwhile, runs at different depths
would measure different code and a per-layer fit would mix them. `freeze` copies the package
once at the start, either as committed at HEAD (`git archive`, which reads the repository and
changes nothing) or as it is in the working tree, and the children import that copy (they run
with it as their working directory and first `PYTHONPATH` entry).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

PACKAGE = "moecompress"
SOURCES = ("head", "worktree")


def _git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, check=True, timeout=120).stdout


def tree_digest(folder: Path) -> str:
    """sha256 over the relative paths and bytes of every file under `folder` (caches skipped)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def freeze(repo: Path, dest: Path, source: str = "worktree") -> dict[str, Any]:
    """Copy `repo`'s moecompress package into `dest`/moecompress; returns what was copied.

    `source` "head": the package as committed at HEAD; "worktree": as it is on disk now
    (uncommitted edits included, caches skipped).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    dest.mkdir(parents=True, exist_ok=True)
    commit = _git(repo, "rev-parse", "--short", "HEAD").decode().strip()
    if source == "head":
        archive = _git(repo, "archive", "--format=tar", "HEAD", PACKAGE)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    else:
        shutil.copytree(repo / PACKAGE, dest / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    changed = _git(repo, "status", "--porcelain", "--", PACKAGE).decode().strip()
    return {"source": source, "commit": commit, "path": str(dest),
            "worktree_differs_from_head": bool(changed), "sha256": tree_digest(dest / PACKAGE)}
