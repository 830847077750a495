"""Write a GGUF file tensor by tensor, to a temporary sibling renamed into place when complete.

`GGUFWriter` normally keeps every tensor in memory until the end; here the tensors are planned
first (name, numpy shape, GGML type: what the header lists), the header, metadata and tensor
table are written, and then each tensor's bytes are written as it is produced, in the planned
order, so memory holds one tensor (one layer's stacked experts) at a time.

An existing output is refused without `force`; a failure or interruption removes the
temporary file, so a partial GGUF is never left under the output's name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from moecompress.errors import MoecompressError
from moecompress.io.gguf.types import byte_shape
from moecompress.io.output import disk_error


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: GGUF name, numpy shape (outermost first) and stored GGML type."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return int(np.prod(byte_shape(self.shape, self.qtype)))


def check_output_file(out: str | Path, force: bool, source: str | Path | None = None) -> Path:
    """Validate the output path before any work: not a folder, not the input, not existing without force."""
    path = Path(out)
    if path.is_dir():
        raise MoecompressError(f"output {str(path)!r} is a folder; pass a file path such as {path / 'model.gguf'}")
    if source is not None and path.resolve().is_relative_to(Path(source).resolve()):
        raise MoecompressError(f"output {str(path)!r} is inside the input checkpoint; choose another path "
                               "(inputs are never modified)")
    if path.exists() and not force:
        raise MoecompressError(f"output file {str(path)!r} exists; pass --force to replace it")
    return path


@contextlib.contextmanager
def atomic_output_file(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success it is renamed to `out`, on failure removed."""
    path = check_output_file(out, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(handle)
    except OSError as err:
        raise (disk_error(err, path, "create the output file") or err) from None
    tmp = Path(name)
    try:
        yield tmp
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise (disk_error(err, path, "write the output file") or err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp made it private; give the output the usual permissions
    os.replace(tmp, path)


class StreamingGGUF:
    """A GGUF file whose metadata is set up front and whose tensors are written one at a time.

    Usage: `add_*` metadata on `.writer`, `plan(tensors)`, `open(path)`, then `write(name, data)`
    for every planned tensor in order, then `close()`.
    """

    def __init__(self, arch_name: str) -> None:
        self.writer = GGUFWriter(path=None, arch=arch_name)
        self.planned: list[PlannedTensor] = []
        self._next = 0

    def plan(self, tensors: list[PlannedTensor]) -> None:
        """Declare every tensor of the file (in write order) before it is opened."""
        seen: set[str] = set()
        for tensor in tensors:
            if tensor.name in seen:
                raise MoecompressError(f"internal error: two tensors would be written as {tensor.name}")
            seen.add(tensor.name)
            self.writer.add_tensor_info(tensor.name, byte_shape(tensor.shape, tensor.qtype), np.dtype(np.uint8),
                                        tensor.nbytes, raw_dtype=tensor.qtype)
        self.planned = list(tensors)

    def open(self, path: Path) -> None:
        """Write the header, the metadata and the tensor table to `path`."""
        self.writer.write_header_to_file(path)
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def write(self, name: str, data: np.ndarray) -> None:
        """Write the next planned tensor's encoded bytes (uint8, as `types.encode` returns)."""
        expected = self.planned[self._next]
        if name != expected.name or data.nbytes != expected.nbytes:
            raise MoecompressError(f"internal error: wrote {name} ({data.nbytes} bytes) where {expected.name} "
                                   f"({expected.nbytes} bytes) was planned")
        self.writer.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
        self._next += 1

    def close(self) -> None:
        """Flush and close the file; every planned tensor must have been written."""
        if self._next != len(self.planned):
            missing = self.planned[self._next].name if self._next < len(self.planned) else "?"
            self.writer.close()
            raise MoecompressError(f"internal error: the GGUF file is missing tensor {missing}")
        self.writer.close()
