"""Safetensors files read and written one tensor at a time, without holding a shard in memory.

Reading: `TensorFiles` parses the headers of a checkpoint's shards (8-byte little-endian
header length, JSON header with dtype, shape and byte offsets per tensor) and hands out
tensors that are zero-copy views of a private (copy-on-write) memory map of their bytes, one
map per tensor handed out. Their pages are clean, file-backed pages: the kernel drops them
under memory pressure, so reading a 60 GB checkpoint tensor by tensor holds no anonymous
memory until a tensor is copied, converted or written to. Writing to such a tensor never
reaches the file, and the next read of the same tensor maps the file afresh.

Writing: `ShardWriter` writes tensors into shards of at most `max_shard_bytes` as they come:
each tensor's bytes go to disk when it is added (a spool file per shard, prefixed by the
shard's header when the shard is closed), so the writer holds no tensor (safetensors' own
`save_file` serialises the whole dict in memory at once).
`finish()` writes `model.safetensors.index.json` (or a single `model.safetensors`). Output
files get the permissions the umask gives (safetensors' writer makes them 0600).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecompress.errors import MoecompressError
from moecompress.io.output import fault_point

# safetensors dtype codes <-> torch dtypes
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}
_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in _DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and byte range inside the file."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors of one safetensors file (name -> entry) and its `__metadata__`; corrupt files raise one line."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise MoecompressError(f"{path} is not a readable safetensors file ({err}); the checkpoint is corrupt") from None
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + length
    entries = {}
    for name, info in header.items():
        code = info.get("dtype")
        if code not in _DTYPES:
            raise MoecompressError(f"{path}: tensor {name!r} has dtype {code!r}, which moecompress cannot read")
        start, end = (base + int(v) for v in info["data_offsets"])
        if end > size:
            raise MoecompressError(f"{path} is truncated (tensor {name!r} ends past the end of the file); "
                                   "re-download or re-save the checkpoint")
        entries[name] = TensorEntry(name, path, _DTYPES[code], tuple(int(d) for d in info["shape"]), start, end)
    return entries, metadata


class TensorFiles:
    """Every tensor of a set of safetensors files, read lazily through memory maps."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        for file in files:
            entries, metadata = read_header(Path(file))
            self.entries.update(entries)
            self.metadata[Path(file)] = metadata
        self._maps: dict[Path, mmap.mmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self.entries)

    def parts(self, name: str) -> tuple[str, ...]:
        """The stored tensors `name` is made of: itself (see `stored_formats.StoredTensors` for quantised ones)."""
        return (name,)

    def is_quantized(self, name: str) -> bool:
        """Whether `name` is stored quantised: never, in a plain float checkpoint."""
        return False

    @property
    def store(self) -> TensorFiles:
        """The files that hold the stored parts (these files themselves)."""
        return self

    @property
    def copies_on_read(self) -> bool:
        """Tensors are views of clean file-backed pages (the kernel can drop them), not new memory."""
        return False

    def _map(self, path: Path) -> mmap.mmap:
        """A shared read-only map of a whole file (for byte copies)."""
        found = self._maps.get(path)
        if found is None:
            with open(path, "rb") as handle:
                found = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = found
        return found

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy, writable tensor over the tensor's bytes in the file (a private copy-on-write map)."""
        entry = self.entries.get(name)
        if entry is None:
            raise MoecompressError(f"tensor {name!r} is missing from the checkpoint's safetensors files")
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        start = entry.start - entry.start % mmap.ALLOCATIONGRANULARITY  # maps start on a page boundary
        with open(entry.file, "rb") as handle:
            region = mmap.mmap(handle.fileno(), entry.end - start, access=mmap.ACCESS_COPY, offset=start)
        flat = torch.frombuffer(region, dtype=torch.uint8, count=entry.nbytes, offset=entry.start - start)
        return flat.view(entry.dtype).view(entry.shape)

    def raw(self, name: str) -> memoryview:
        """The tensor's stored bytes, exactly as on disk (read-only)."""
        entry = self.entries[name]
        return memoryview(self._map(entry.file))[entry.start:entry.end]

    def close(self) -> None:
        """Drop the memory maps (tensors handed out keep theirs alive)."""
        self._maps.clear()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor in row-major order (a copy only when it is not contiguous or not on the CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ShardWriter:
    """Write tensors into numbered safetensors shards as they come; the index is written last.

    Each tensor's bytes go to the current shard's spool file the moment it is added, so the
    writer holds no tensor after `add` returns. A shard is closed when the next tensor would
    pass `max_shard_bytes`: its header is written, then the spooled bytes are appended.
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int | str = "2GB", metadata: dict[str, str] | None = None,
                 prefix: str = "model") -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = _parse_size(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.prefix = prefix
        self._header: dict[str, object] = {}
        self._offset = 0
        self._spool: Any = None
        self._shards: list[tuple[str, list[str], int]] = []  # (temporary file name, tensor names, bytes)
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write a tensor into the current shard."""
        self._add(name, tensor.dtype, tuple(tensor.shape), [_tensor_bytes(tensor)])

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write several named tensors, in order."""
        for name, tensor in tensors.items():
            self.add(name, tensor)

    def add_raw(self, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                data: memoryview | list[memoryview]) -> None:
        """Write a tensor given as its stored bytes, whole or in consecutive pieces (rows of an input tensor)."""
        self._add(name, dtype, tuple(shape), data if isinstance(data, list) else [data])

    def _add(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], pieces: list[memoryview]) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name!r} written twice")
        if dtype not in _CODES:
            raise MoecompressError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        nbytes = sum(len(piece) for piece in pieces)
        expected = dtype.itemsize
        for dim in shape:
            expected *= dim
        if nbytes != expected:
            raise ValueError(f"tensor {name!r}: {nbytes} bytes for shape {list(shape)} of {dtype}")
        self._seen.add(name)
        if self._header and self._offset + nbytes > self.max_shard_bytes:
            self.flush()
        if self._spool is None:
            self._spool = open(self.folder / f".{self.prefix}-spool-{len(self._shards) + 1:05d}", "wb")
        for piece in pieces:
            self._spool.write(piece)
        self._header[name] = {"dtype": _CODES[dtype], "shape": list(shape),
                              "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes

    def flush(self) -> None:
        """Close the current shard: header, then its spooled bytes."""
        if not self._header:
            return
        spool_path = Path(self._spool.name)
        self._spool.close()
        encoded = json.dumps({"__metadata__": self.metadata, **self._header}, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
        name = f".{self.prefix}-shard-{len(self._shards) + 1:05d}.safetensors"
        with open(self.folder / name, "wb") as handle, open(spool_path, "rb") as spool:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            shutil.copyfileobj(spool, handle, 16 * 2**20)
        spool_path.unlink()
        _readable_by_all(self.folder / name)
        fault_point("shard-written")
        self._shards.append((name, list(self._header), self._offset))
        self.total_bytes += self._offset
        self._header, self._offset, self._spool = {}, 0, None

    def state(self) -> dict[str, Any]:
        """What `restore` needs to continue this writer in another process; take it between two tensors."""
        if self._spool is not None:
            self._spool.flush()  # the spooled bytes the state counts are in the file, not in Python's buffer
        return {"header": dict(self._header), "offset": self._offset, "total_bytes": self.total_bytes,
                "shards": [list(shard) for shard in self._shards]}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue writing as the writer whose `state()` this is (a resumed run, same folder and settings).

        What that writer wrote after its state was taken is dropped: later shards and spools, and
        the current spool's bytes past the state's offset. A shard that was closed after the
        state was taken gives its spooled bytes back (its spool is gone by then); a writer that
        had finished (its shards renamed to their final names) is taken back to its shards first.
        """
        finished = sorted(self.folder.glob(f"{self.prefix}-*-of-*.safetensors"))
        if not finished and (self.folder / f"{self.prefix}.safetensors").is_file():
            finished = [self.folder / f"{self.prefix}.safetensors"]
        for number, path in enumerate(finished, start=1):  # the writer had finished: its shards carry final names
            os.replace(path, self.folder / f".{self.prefix}-shard-{number:05d}.safetensors")
        (self.folder / f"{self.prefix}.safetensors.index.json").unlink(missing_ok=True)
        self._header = dict(state["header"])
        self._offset = int(state["offset"])
        self.total_bytes = int(state["total_bytes"])
        self._shards = [(str(name), list(names), int(size)) for name, names, size in state["shards"]]
        self._seen = {name for _, names, _ in self._shards for name in names} | set(self._header)
        missing = [name for name, _, _ in self._shards if not (self.folder / name).is_file()]
        if missing:
            raise MoecompressError(f"cannot resume writing {self.folder}: shard {missing[0]} is gone; drop --resume "
                                   "to start over")
        current = len(self._shards) + 1
        spool = self.folder / f".{self.prefix}-spool-{current:05d}"
        shard = self.folder / f".{self.prefix}-shard-{current:05d}.safetensors"
        for kind in ("spool", "shard"):
            for path in self.folder.glob(f".{self.prefix}-{kind}-*"):
                if int(path.name.split("-")[-1].split(".")[0]) > current:
                    path.unlink()
        self._spool = None
        if not self._header:
            spool.unlink(missing_ok=True)
            shard.unlink(missing_ok=True)
            return
        if not spool.exists():
            if not shard.exists():
                raise MoecompressError(f"cannot resume writing {self.folder}: the bytes of its unfinished shard are "
                                       "gone; drop --resume to start over")
            with open(shard, "rb") as closed, open(spool, "wb") as handle:
                (length,) = struct.unpack("<Q", closed.read(8))
                closed.seek(8 + length)
                handle.write(closed.read(self._offset))
        shard.unlink(missing_ok=True)
        handle = open(spool, "r+b")
        handle.truncate(self._offset)
        handle.seek(self._offset)
        self._spool = handle

    def finish(self) -> list[Path]:
        """Write the last shard, name the shards as transformers does, write the index; returns the files."""
        self.flush()
        if len(self._shards) == 1:
            final = [self.prefix + ".safetensors"]
        else:
            final = [f"{self.prefix}-{i + 1:05d}-of-{len(self._shards):05d}.safetensors" for i in range(len(self._shards))]
        weight_map: dict[str, str] = {}
        for (temporary, names, _), target in zip(self._shards, final):
            os.replace(self.folder / temporary, self.folder / target)
            weight_map.update({name: target for name in names})
        if len(self._shards) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [self.folder / name for name in final]


def _readable_by_all(path: Path) -> None:
    """Give a written file the permissions the umask allows (0644 under the usual umask)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
