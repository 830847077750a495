"""The same command twice gives byte-identical files (recorded creation times and durations aside), on every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import make_checkpoint, run_cli

CALIBRATION = ["--samples", "3", "--seq-len", "32", "--batch-size", "2"]
# fields that record when or how long, not what
VOLATILE = {"created", "seconds", "total_seconds"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


def _stable(value: object) -> object:
    """A parsed JSON value without its VOLATILE keys, at any depth."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _contents(folder: Path) -> dict[str, object]:
    """Every file of a folder by relative path: its bytes, or for JSON files the parsed content minus VOLATILE keys."""
    out: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        out[name] = _stable(json.loads(path.read_text())) if path.suffix == ".json" else path.read_bytes()
    return out


@pytest.mark.parametrize("command", [
    ["calibrate", *CALIBRATION],
    ["prune", "--method", "reap", "--ratio", "0.5", *CALIBRATION],
    ["prune", "--method", "heapr", "--ratio", "0.25", *CALIBRATION],
    ["quantize", "--bits", "2.5", *CALIBRATION],
    ["condense", "--layers", "1", "--experts", "2", "--no-timing", *CALIBRATION],
    ["compress", "--size", "60%", *CALIBRATION],
])
def test_same_command_twice_gives_identical_files(command, checkpoint, tmp_path, monkeypatch, capsys) -> None:
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / run
        code, _, err = run_cli([command[0], str(checkpoint), *command[1:], "-o", str(out)], monkeypatch, capsys)
        assert code == 0, err
        outputs.append(_contents(out))
    first, second = outputs
    assert first.keys() == second.keys()
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"{' '.join(command)}: {differing} differ between two identical runs"


def test_eval_twice_gives_the_same_report(checkpoint, tmp_path, monkeypatch, capsys) -> None:
    reports = []
    for run in ("first", "second"):
        path = tmp_path / f"{run}.json"
        code, _, err = run_cli(["eval", str(checkpoint), "--seq-len", "32", "--windows", "2", "--json-out", str(path)],
                               monkeypatch, capsys)
        assert code == 0, err
        reports.append(_stable(json.loads(path.read_text())))
    assert reports[0] == reports[1]
