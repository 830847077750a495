"""The README's first command: `moecompress demo` on the embedded example model."""

from __future__ import annotations

import json
import math

from transformers import AutoModelForCausalLM

from moecompress.cli.demo_cmd import example_model_dir
from moecompress.io.manifest import read_manifest
from tests.cli_helpers import error_lines, run_cli


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "demo"
    args = ["demo", "-o", str(out), "--samples", "4", "--seq-len", "64", "--windows", "4"]
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "Perplexity before and after pruning" in stdout
    results = json.loads((out / "DEMO.json").read_text())["results"]
    assert set(results) == {"original", "frequency -50%", "easy_ep -50%"}  # the default method beside the baseline
    for report in results.values():
        assert all(math.isfinite(r["perplexity"]) and r["windows"] == 4 for r in report["domains"])
    for name in ("frequency", "easy_ep"):
        folder = out / f"pruned-{name}"
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.num_experts == 4
        assert read_manifest(folder)["method"] == name
    assert (example_model_dir() / "model.safetensors").is_file()
    # A second run replaces the demo's own previous output; other non-empty folders are refused.
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    code, _, err = run_cli(["demo", "-o", str(other)], monkeypatch, capsys)
    assert code == 2 and "--force" in error_lines(err)[0]
    assert (other / "keep.txt").read_text() == "x"
