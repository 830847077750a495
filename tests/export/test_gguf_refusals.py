"""What `export gguf` refuses, each in one line before anything is written; never a partial file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gguf")

from moecompress.errors import MoecompressError  # noqa: E402
from moecompress.export.gguf import export_gguf  # noqa: E402
from tests.cli_helpers import error_lines, run_cli  # noqa: E402


def _copy(example_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(example_dir, folder)
    return folder


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _refused(folder: Path, out: Path, match: str, **kwargs: Any) -> None:
    with pytest.raises(MoecompressError, match=match) as caught:
        export_gguf(folder, out, progress=False, **kwargs)
    assert "\n" not in str(caught.value)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def test_non_uniform_layout_is_refused(example_dir: Path, tmp_path: Path) -> None:
    folder = _copy(example_dir, tmp_path)
    (folder / "moecompress_layout.json").write_text("{}")
    _refused(folder, tmp_path / "out.gguf", "non-uniform layout .*one expert count and one expert width")


def test_gptq_folder_is_refused(example_dir: Path, tmp_path: Path) -> None:
    folder = _copy(example_dir, tmp_path)
    _edit_json(folder / "config.json", quantization_config={"quant_method": "gptq", "bits": 4})
    _refused(folder, tmp_path / "out.gguf", "GPTQ checkpoint .*export the unquantised checkpoint")


def test_unmapped_architecture_is_refused(tiny_dir: Any, tmp_path: Path) -> None:
    _refused(tiny_dir("olmoe"), tmp_path / "out.gguf",
             "no llama.cpp mapping for model_type 'olmoe'; supported: deepseek_v3, mixtral, qwen3_moe")


def test_qwen3_moe_with_dense_layers_is_refused(tiny_dir: Any, tmp_path: Path) -> None:
    _refused(tiny_dir("qwen3_moe"), tmp_path / "out.gguf", "dense layers")  # the tiny config has mlp_only_layers=[0]


@pytest.mark.parametrize("changes,match", [
    ({"norm_topk_prob": False}, "norm_topk_prob false"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}, "rope_type 'linear'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "attention_factor": 0.5,
                          "original_max_position_embeddings": 128}}, "attention_factor 0.5"),
])
def test_settings_llama_cpp_would_compute_differently_are_refused(example_dir: Path, tmp_path: Path,
                                                                  changes: dict[str, Any], match: str) -> None:
    folder = _copy(example_dir, tmp_path)
    _edit_json(folder / "config.json", **changes)
    _refused(folder, tmp_path / "out.gguf", match)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}),
     "not a byte-level regex split"),
    (lambda t: t["pre_tokenizer"].update(add_prefix_space=True), "adds a prefix space"),
    (lambda t: t["model"].update(byte_fallback=True), "byte fallback"),
    (lambda t: t.update(normalizer={"type": "Lowercase"}), "normalises text"),
    (lambda t: t.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\d|\w+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}),
     "matches none of llama.cpp's pre-tokenizers"),
])
def test_tokenizers_llama_cpp_cannot_reproduce_are_refused(example_dir: Path, tmp_path: Path, edit: Any,
                                                           match: str) -> None:
    folder = _copy(example_dir, tmp_path)
    spec = json.loads((folder / "tokenizer.json").read_text())
    edit(spec)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    _refused(folder, tmp_path / "out.gguf", match)


def test_existing_output_needs_force(example_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    out.write_text("keep me")
    _refused_existing = pytest.raises(MoecompressError, match="exists; pass --force")
    with _refused_existing:
        export_gguf(example_dir, out, progress=False)
    assert out.read_text() == "keep me"
    export_gguf(example_dir, out, output_type="q8_0", force=True, progress=False)
    assert out.read_bytes()[:4] == b"GGUF"


def test_output_folder_and_unknown_type_are_refused(example_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MoecompressError, match="is a folder"):
        export_gguf(example_dir, tmp_path, progress=False)
    _refused(example_dir, tmp_path / "out.gguf", "unknown GGUF type 'q4_k'", output_type="q4_k")


def test_a_failure_mid_write_leaves_no_file(example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moecompress.export.gguf as stage

    real, calls = stage.encode_tensor, []

    def failing(array: Any, qtype: Any) -> Any:
        calls.append(1)
        if len(calls) == 10:
            raise OSError(28, "No space left on device")
        return real(array, qtype)

    monkeypatch.setattr(stage, "encode_tensor", failing)
    _refused(example_dir, tmp_path / "out.gguf", "the disk is full")


def test_cli_prints_one_error_line(example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    folder = _copy(example_dir, tmp_path)
    _edit_json(folder / "config.json", quantization_config={"quant_method": "gptq", "bits": 4})
    code, _, err = run_cli(["export", "gguf", str(folder), "-o", str(tmp_path / "out.gguf")], monkeypatch, capsys)
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and "GPTQ checkpoint" in lines[0]


def test_cli_writes_the_file(example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "example.gguf"
    code, stdout, err = run_cli(["export", "gguf", str(example_dir), "-o", str(out), "--no-progress"],
                                monkeypatch, capsys)
    assert code == 0, err
    assert "llama.cpp arch qwen3moe, type bf16" in stdout  # auto: the example is stored in bfloat16
    assert out.is_file()
