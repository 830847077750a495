"""`moecompress run`: the same checkpoints as the equivalent CLI commands, one calibration pass, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moecompress.errors import MoecompressError
from moecompress.recipe import run_recipe
from tests.cli_helpers import error_lines, run_cli
from tests.recipes.conftest import write_recipe

CALIB = ["--samples", "2", "--seq-len", "32", "--batch-size", "2"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    assert out, f"no tensors in {folder}"
    return out


def _assert_identical(a: Path, b: Path) -> None:
    left, right = _tensors(a), _tensors(b)
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype and torch.equal(left[name], right[name]), name


def test_run_writes_bit_for_bit_what_the_cli_commands_write(tiny_model, small_data, tmp_path, monkeypatch,
                                                            capsys) -> None:
    import moecompress.calibration.calibrate as calibration

    data = ["--data", f"code={small_data['code']}", "--data", f"prose={small_data['prose']}"]
    cli = tmp_path / "cli"
    steps = [["calibrate", str(tiny_model), *data, *CALIB, "-o", str(cli / "stats")],
             ["prune", str(tiny_model), "--stats", str(cli / "stats"), "--method", "reap", "--ratio", "0.5", *data,
              *CALIB, "-o", str(cli / "pruned")],
             ["quantize", str(cli / "pruned"), "--bits", "2.5", "--min-tokens", "4", *data, *CALIB,
              "-o", str(cli / "quantized")]]
    for args in steps:
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code == 0, err

    passes = []
    observe = calibration.collect_statistics
    monkeypatch.setattr(calibration, "collect_statistics", lambda *a, **k: passes.append(1) or observe(*a, **k))
    recipe = write_recipe(tmp_path, f"""\
version: 1
model: {tiny_model}
calibration:
  domains: {{code: {small_data['code']}, prose: {small_data['prose']}}}
  samples: 2
  seq_len: 32
steps:
  - op: calibrate
    batch_size: 2
  - op: prune
    method: reap
    ratio: 0.5
    batch_size: 2
  - op: quantize
    bits: 2.5
    min_tokens: 4
    batch_size: 2
  - op: write
""")
    code, out, err = run_cli(["run", str(recipe), "-o", str(tmp_path / "run")], monkeypatch, capsys)
    assert code == 0, err
    assert "[2/4] prune" in out and "achieved average: 2.500" in out
    assert len(passes) == 1, "one calibration pass must feed the prune step"
    run = tmp_path / "run"
    _assert_identical(cli / "stats", run / "00-calibrate")
    _assert_identical(cli / "pruned", run / "01-prune")
    _assert_identical(cli / "quantized", run / "02-quantize")
    _assert_identical(cli / "quantized", run / "model")
    assert (cli / "quantized" / "config.json").read_text() == (run / "model" / "config.json").read_text()
    plans = [json.loads((folder / "quant_plan.json").read_text()) for folder in (cli / "quantized", run / "model")]
    assert plans[0]["entries"] == plans[1]["entries"]
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "done" and [s["op"] for s in manifest["steps"]] == [
        "calibrate", "prune", "quantize", "write"]
    assert manifest["steps"][1]["summary"]["kept_per_layer"] == {"0": 4, "1": 4, "2": 4, "3": 4}
    pruned = json.loads((run / "01-prune" / "moecompress_manifest.json").read_text())
    assert pruned["calibration"]["stats_digest"] == json.loads(
        (cli / "pruned" / "moecompress_manifest.json").read_text())["calibration"]["stats_digest"]


RESUMABLE = """\
version: 1
model: {model}
calibration:
  domains: {{code: {code}}}
  samples: 2
  seq_len: 32
steps:
  - op: calibrate
  - op: prune
    method: frequency
    ratio: 0.5
  - op: eval
    windows: 2
  - op: write
    output: {dest}
"""


def test_resume_skips_unchanged_steps_and_reruns_what_changed(tiny_model, small_data, tmp_path,
                                                             monkeypatch) -> None:
    from moecompress.recipe import execute

    dest = tmp_path / "final"
    recipe = write_recipe(tmp_path, RESUMABLE.format(model=tiny_model, code=small_data["code"], dest=dest))
    run = tmp_path / "run"
    real_eval = execute.run_eval

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(execute, "run_eval", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, output=run, progress=False)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "interrupted"
    assert [(s["op"], s["status"]) for s in manifest["steps"]] == [("calibrate", "done"), ("prune", "done"),
                                                                   ("eval", "failed")]
    with pytest.raises(MoecompressError, match="--resume"):
        run_recipe(recipe, output=run, progress=False)

    ran: list[str] = []
    for name in ("run_calibrate", "run_prune", "run_eval", "run_write"):
        real = real_eval if name == "run_eval" else getattr(execute, name)
        monkeypatch.setattr(execute, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k))
    run_recipe(recipe, output=run, resume=True, progress=False)
    assert ran == ["run_eval", "run_write"]
    assert (dest / "config.json").is_file() and (run / "02-eval" / "eval.json").is_file()

    ran.clear()
    manifest = run_recipe(recipe, output=run, resume=True, progress=False)
    assert ran == [] and all(step.get("skipped") for step in manifest["steps"])

    ran.clear()
    run_recipe(recipe, ["steps.1.ratio=0.25"], output=run, resume=True, progress=False)
    assert ran == ["run_prune", "run_eval", "run_write"]  # calibration unchanged, everything after prune re-runs
    kept = json.loads((run / "run.json").read_text())["steps"][1]["summary"]["kept_per_layer"]
    assert set(kept.values()) == {6}

    ran.clear()
    run_recipe(recipe, ["steps.1.ratio=0.25"], output=run, force=True, progress=False)
    assert ran == ["run_calibrate", "run_prune", "run_eval", "run_write"]


def test_run_folder_and_write_destination_are_protected(tiny_model, small_data, tmp_path, monkeypatch,
                                                       capsys) -> None:
    dest = tmp_path / "final"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    recipe = write_recipe(tmp_path, RESUMABLE.format(model=tiny_model, code=small_data["code"], dest=dest)
                          .replace("  - op: eval\n    windows: 2\n", ""))
    code, _, err = run_cli(["run", str(recipe), "-o", str(tmp_path / "run")], monkeypatch, capsys)
    assert code == 2 and "--force" in error_lines(err)[0] and (dest / "keep.txt").read_text() == "mine"
    assert "recipe.yaml:13: steps[2].output:" in error_lines(err)[0]
    assert not (tmp_path / "run").exists()  # refused before any step ran
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    code, _, err = run_cli(["run", str(recipe), "-o", str(busy)], monkeypatch, capsys)
    assert code == 2 and "--resume" in error_lines(err)[0]
    code, _, err = run_cli(["run", str(recipe), "-o", str(busy), "--resume"], monkeypatch, capsys)
    assert code == 2 and "not a moecompress run folder" in error_lines(err)[0]
