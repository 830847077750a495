"""Host memory budgets: parse `--max-memory`, and find what this process may use when none is given."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from pathlib import Path

from moecompress.errors import MoecompressError

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# share of the headroom found (available memory, after what the process already holds) a run plans to use by default
DEFAULT_SHARE = 0.85


def parse_memory(text: str | int | None) -> int | None:
    """Bytes from `--max-memory` text such as 4GiB, 3.5GB or 800MB (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise MoecompressError(f"--max-memory {text!r}: give a size such as 4GiB, 3.5GB or 800MB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise MoecompressError(f"--max-memory {text!r} must be positive")
    return value


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_headroom() -> int | None:
    """limit - usage of this process's memory cgroup (v1 or v2), when it has a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        candidates = []
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            candidates.append((base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"))
        elif controllers == "":
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            candidates.append((base / "memory.max", base / "memory.current"))
        for limit_file, usage_file in candidates:
            try:
                limit_text = limit_file.read_text().strip()
                if limit_text == "max" or int(limit_text) >= 2**60:
                    continue
                return int(limit_text) - int(usage_file.read_text().strip())
            except (OSError, ValueError):
                continue
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate: the smaller of MemAvailable and its cgroup's headroom."""
    found = [value for value in (_meminfo_available(), _cgroup_headroom()) if value is not None]
    return min(found) if found else None


def default_budget() -> int | None:
    """The host-memory budget a run plans with when `--max-memory` is not given (None: unknown)."""
    available = available_memory()
    return None if available is None else int(available * DEFAULT_SHARE)


def format_gib(count: int) -> str:
    """Bytes as GiB with two decimals, for messages."""
    return f"{count / 2**30:.2f} GiB"


@functools.cache
def _malloc_trim() -> object | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand memory freed by the allocator back to the system (glibc's `malloc_trim(0)`; a no-op elsewhere).

    A layer's tensors (expert weights of a few MiB each) are allocated below glibc's dynamic
    mmap threshold, so once freed they stay in the heap as free chunks: measured at Qwen3-30B-A3B
    shapes, up to 1.7 GiB of a finished layer stayed resident into the next. Called after each
    layer and each group of experts is released, it keeps the process's resident memory at what
    it holds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
