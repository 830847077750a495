"""The streaming safetensors reader and writer against safetensors' own implementation."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moecompress.errors import MoecompressError
from moecompress.io.safetensors_stream import ShardWriter, TensorFiles, read_header


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(6, 5, generator=gen).to(torch.bfloat16),
        "b.bias": torch.randn(7, generator=gen),
        "c.ids": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "d.fp8": torch.randn(4, 4, generator=gen).to(torch.float8_e4m3fn),
        "e.mask": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 3),
    }


def test_reader_gives_safetensors_tensors_without_copying(tmp_path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    files = TensorFiles([tmp_path / "x.safetensors"])
    assert set(files.names()) == set(tensors)
    for name, expected in tensors.items():
        got = files.tensor(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)) if got.numel() else True
    with pytest.raises(MoecompressError, match="missing"):
        files.tensor("nope")
    first = files.tensor("b.bias")
    first.zero_()  # a private copy-on-write map: the file and the next read are untouched
    assert torch.equal(files.tensor("b.bias"), tensors["b.bias"])
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("b.bias"), tensors["b.bias"])


def test_writer_round_trips_through_safe_open_with_shards_and_index(tmp_path) -> None:
    tensors = _tensors()
    writer = ShardWriter(tmp_path, max_shard_bytes=64)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    files = writer.finish()
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, expected in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][name]), framework="pt") as handle:
            got = handle.get_tensor(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)) if got.numel() else True
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o666 & ~umask


def test_raw_pieces_copy_rows_byte_for_byte(tmp_path) -> None:
    source = {"w": torch.arange(24, dtype=torch.float32).reshape(4, 6)}
    save_file(source, str(tmp_path / "in.safetensors"))
    files = TensorFiles([tmp_path / "in.safetensors"])
    raw = files.raw("w")
    row = 6 * 4
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out)
    writer.add_raw("w", torch.float32, (2, 6), [raw[3 * row:4 * row], raw[1 * row:2 * row]])
    writer.finish()
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("w"), source["w"][[3, 1]])
    writer = ShardWriter(out, prefix="again")
    with pytest.raises(ValueError, match="twice"):
        writer.add("x", torch.zeros(1))
        writer.add("x", torch.zeros(1))


def test_truncated_file_is_one_line_error(tmp_path) -> None:
    save_file({"w": torch.zeros(100)}, str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-10])
    with pytest.raises(MoecompressError, match="truncated"):
        read_header(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(b"abc")
    with pytest.raises(MoecompressError, match="not a readable safetensors file"):
        read_header(tmp_path / "y.safetensors")
