"""Drop a checkpoint's pages from the page cache, so the next reader loads them from disk.

cgroup v1 charges a cached page to the group that first brought it in: pages left in the
cache by an earlier run (or by the build) would be free for the next capped run and hide its
file-backed reads from the cap. `evict` flushes and drops the pages of one folder's files
(`posix_fadvise(DONTNEED)`), not the whole system's cache.
"""

from __future__ import annotations

import os
from pathlib import Path


def evict(folder: str | Path) -> int:
    """Write back and drop the cached pages of every file in `folder`; returns the bytes covered."""
    covered = 0
    if not hasattr(os, "posix_fadvise"):
        return covered
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            covered += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return covered
