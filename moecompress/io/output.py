"""Write output folders atomically: build in a temporary sibling, rename into place when complete.

Nothing is lost on failure or interruption: the temporary folder is removed, an existing
output is only replaced with `force=True`, and never before the new one is complete. A run
killed outright (SIGKILL, power loss) cannot clean up: it leaves the hidden temporary sibling
`.NAME.tmp-*`, which holds the `MOECOMPRESS_INCOMPLETE` marker from its creation until just
before the rename, so moecompress refuses to read it as a checkpoint (`moecompress.unfinished`).

`MOECOMPRESS_FAULT=<point>` kills the process with SIGKILL at a named point (`fault_point`):
the kill-and-resume tests use it to stop a run exactly there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moecompress.errors import MoecompressError
from moecompress.unfinished import INCOMPLETE_MARKER


def check_output_dir(path: str | Path, force: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Validate an output folder before any work: not an input, not a non-empty folder without force."""
    out = Path(path)
    for item in inputs:
        if Path(item).resolve() == out.resolve():
            raise MoecompressError(f"output {str(out)!r} is the input checkpoint; choose another folder (inputs are never modified)")
    if out.exists() and not out.is_dir():
        raise MoecompressError(f"output {str(out)!r} exists and is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MoecompressError(f"output folder {str(out)!r} is not empty; pass --force to replace it")
    return out


FAULT_ENV = "MOECOMPRESS_FAULT"
FAULT_RANK_ENV = "MOECOMPRESS_FAULT_RANK"


def fault_point(name: str, detail: str | None = None) -> None:
    """Die by SIGKILL here when $MOECOMPRESS_FAULT names this point, as `name` or `name:detail` (kill tests)."""
    wanted = os.environ.get(FAULT_ENV)
    only_rank = os.environ.get(FAULT_RANK_ENV)  # under torchrun: only this rank dies
    if only_rank is not None and os.environ.get("RANK", "0") != only_rank:
        return
    if wanted is not None and (wanted == name or (detail is not None and wanted == f"{name}:{detail}")):
        os.kill(os.getpid(), signal.SIGKILL)


# write failures that come from where the output goes, not from the input: reported in one line with what to do
_DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "a file grew past the file-size limit", errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def disk_error(err: OSError, out: Path, doing: str) -> MoecompressError | None:
    """A one-line error for a failure to write `out` (None: not a disk or permission problem)."""
    why = _DISK_ERRORS.get(err.errno or -1)
    if why is None:
        return None
    return MoecompressError(f"cannot {doing} {str(out)!r}: {why} ({err.strerror.lower()}); choose an output folder on "
                            "a writable disk with room for it (nothing was written, the input is unchanged)")


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, force: bool = False, folder: Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it becomes `path`.

    A write that fails for lack of room or permission (disk full, quota, read-only file system)
    removes the temporary folder and becomes a one-line `MoecompressError`.
    folder: build the output there instead (on the same file system as `path`), continuing
    what it holds when it is already there (a resumed run, `moecompress.engine.resume`).
    """
    out = check_output_dir(path, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if folder is None:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        else:
            tmp = folder
            tmp.mkdir(parents=True, exist_ok=True)
        (tmp / INCOMPLETE_MARKER).write_text(f"An unfinished moecompress output for {out.name}: the run writing it "
                                             "stopped before the end. Delete this folder.\n")
    except OSError as err:
        raise (disk_error(err, out, "create the output folder") or err) from None
    try:
        fault_point("output-created")
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        found = disk_error(err, out, "write the output folder")
        if found is None:
            raise
        raise found from None
    except KeyboardInterrupt:
        if folder is None:  # a resumable run's folder stays for --resume
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("before-rename")
    (tmp / INCOMPLETE_MARKER).unlink()
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp made it private; give the output the usual permissions
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
