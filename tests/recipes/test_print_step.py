"""`--print-step` prints a command as the recipe step that does the same, and runs nothing."""

from __future__ import annotations

import yaml

from moecompress.recipe.schema import parse_recipe
from tests.cli_helpers import error_lines, run_cli


def _printed(args, monkeypatch, capsys) -> dict:
    code, out, err = run_cli([*args, "--print-step"], monkeypatch, capsys)
    assert code == 0, err
    assert out.startswith("# `moecompress ")
    steps = yaml.safe_load(out)
    assert isinstance(steps, list) and len(steps) == 1
    return steps[0]


def test_print_step_writes_the_non_default_options(tiny_model, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "never"
    step = _printed(["prune", str(tiny_model), "--method", "premoe", "--keep", "4", "--param", "top_k=2",
                     "--data", "code=code.jsonl", "--samples", "8", "--no-protect-super-experts", "-o", str(out)],
                    monkeypatch, capsys)
    assert step == {"op": "prune", "method": "premoe", "keep": 4, "param": {"top_k": 2}, "data": ["code=code.jsonl"],
                    "samples": 8, "no_protect_super_experts": True}
    assert not out.exists()
    step = _printed(["quantize", str(tiny_model), "-o", str(out), "--bits", "2.5", "--candidates", "2,4",
                     "--format", "fake", "--seq-len", "64"], monkeypatch, capsys)
    assert step == {"op": "quantize", "bits": 2.5, "seq_len": 64, "candidates": [2, 4], "format": "fake"}
    assert _printed(["eval", str(tiny_model), "--windows", "4"], monkeypatch, capsys) == {"op": "eval", "windows": 4}
    assert _printed(["calibrate", str(tiny_model), "-o", str(out), "--gradients"], monkeypatch, capsys) == {
        "op": "calibrate", "gradients": True}
    assert _printed(["condense", str(tiny_model), "--layers", "1,2", "--experts", "3"], monkeypatch, capsys) == {
        "op": "condense", "layers": "1,2", "experts": 3}
    assert _printed(["compress", str(tiny_model), "-o", str(out), "--size", "40%"], monkeypatch, capsys) == {
        "op": "compress", "size": "40%"}
    assert _printed(["export", "gguf", str(tiny_model), "-o", str(out), "--bits", "5.5", "--sensitivity", "output"],
                    monkeypatch, capsys) == {"op": "export-gguf", "bits": 5.5, "sensitivity": "output"}
    assert not out.exists()


def test_printed_steps_make_a_valid_recipe(tiny_model, tmp_path, monkeypatch, capsys) -> None:
    steps = [_printed(["calibrate", str(tiny_model), "-o", "s", "--samples", "2"], monkeypatch, capsys),
             _printed(["prune", str(tiny_model), "--ratio", "0.25"], monkeypatch, capsys)]
    loaded = parse_recipe({"version": 1, "model": str(tiny_model), "steps": steps})
    assert [step.op for step in loaded.recipe.steps] == ["calibrate", "prune"]
    assert loaded.recipe.steps[1].ratio == 0.25


def test_print_step_refuses_what_a_recipe_refuses(tiny_model, monkeypatch, capsys) -> None:
    code, out, err = run_cli(["prune", str(tiny_model), "--ratio", "1.5", "--print-step"], monkeypatch, capsys)
    assert code == 2 and error_lines(err) == ["error: ratio: must be < 1 (got 1.5)"]
