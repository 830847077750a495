"""The `export-gguf` recipe step: `moecompress export gguf` on the current checkpoint, into the step's folder."""

from __future__ import annotations

import json

import gguf
import pytest

from moecompress.errors import MoecompressError
from moecompress.recipe import run_recipe
from tests.cli_helpers import run_cli
from tests.recipes.conftest import write_recipe


def test_export_step_writes_what_the_cli_writes(tiny_model, small_data, tmp_path, monkeypatch, capsys) -> None:
    recipe = write_recipe(tmp_path, f"""\
version: 1
model: {tiny_model}
calibration:
  domains: {{code: {small_data['code']}}}
  samples: 2
  seq_len: 32
steps:
  - op: prune
    method: frequency
    keep: 4
  - op: export-gguf
    bits: 5.5
    batch_size: 2
""")
    run = tmp_path / "run"
    manifest = run_recipe(recipe, output=run, progress=False)
    written = run / "01-export-gguf" / "model.gguf"
    summary = manifest["steps"][1]["summary"]
    assert summary["file"] == str(written) and summary["bytes"] == written.stat().st_size
    assert summary["arch"] == "qwen3moe" and summary["bits_per_weight"] <= 5.5

    cli = tmp_path / "cli.gguf"
    code, _, err = run_cli(["export", "gguf", str(run / "00-prune"), "-o", str(cli), "--bits", "5.5",
                            "--data", f"code={small_data['code']}", "--samples", "2", "--seq-len", "32",
                            "--batch-size", "2", "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    reader, theirs = gguf.GGUFReader(written), gguf.GGUFReader(cli)
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in reader.tensors] == \
        [(t.name, t.tensor_type, t.data.tobytes()) for t in theirs.tensors]  # the same checkpoint and data: same file
    ours, cli_record = (json.loads(r.fields["moecompress.manifest"].contents()) for r in (reader, theirs))
    ours.pop("created"), cli_record.pop("created")
    assert ours == cli_record
    assert int(reader.fields["qwen3moe.expert_count"].contents()) == 4
    assert ours["gguf"]["allocation"]["sensitivity"] == "fisher"  # the default


def test_export_after_gptq_is_refused_before_anything_runs(tiny_model, tmp_path) -> None:
    recipe = write_recipe(tmp_path, f"""\
version: 1
model: {tiny_model}
steps:
  - op: quantize
    bits: 4
  - op: export-gguf
""")
    with pytest.raises(MoecompressError, match=r"export-gguf reads float checkpoints and steps\[0\] \(quantize\) "
                                              r"writes GPTQ.*format: fake"):
        run_recipe(recipe, output=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_export_step_budget_errors_point_at_the_key(tiny_model, tmp_path) -> None:
    recipe = write_recipe(tmp_path, f"""\
version: 1
model: {tiny_model}
steps:
  - op: export-gguf
    bits: 5.5
    size: 1GB
""")
    with pytest.raises(MoecompressError, match="give bits or size, not both"):
        run_recipe(recipe, output=tmp_path / "run", progress=False)
