"""`--resume`: a run killed mid-pass continues from its last finished layer and writes the same bytes.

Each command is killed with SIGKILL right after a layer pass saved its checkpoint for a
decoder layer (`MOECOMPRESS_FAULT=layer-checkpointed:<pass>:<layer>`), or just after a shard
was closed; the same command with `--resume` must say where it resumes, and its output must
equal an uninterrupted run's file for file (recorded times and durations aside, as in the
determinism test). The shard writer's own restore is checked at every point of a shard's life.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moecompress.engine.resume import resume_folder
from moecompress.io.safetensors_stream import ShardWriter
from moecompress.unfinished import INCOMPLETE_MARKER
from tests.cli_helpers import error_lines, make_checkpoint
from tests.reliability.test_determinism import _contents

pytestmark = pytest.mark.slow  # each test interrupts and resumes real command processes (10-70 s)

REPO = Path(__file__).resolve().parents[2]
CALIB = ["--samples", "2", "--seq-len", "16"]

COMMANDS = {
    "calibrate": ["calibrate", *CALIB],
    "prune": ["prune", "--method", "frequency", "--ratio", "0.5", *CALIB],
    "prune-sequential": ["prune", "--method", "reap", "--ratio", "0.5", "--scoring", "sequential", *CALIB],
    "quantize": ["quantize", "--bits", "2.5", *CALIB],  # GEMQ, the default: its backward pass starts over
    "quantize-mc-moe": ["quantize", "--bits", "2.5", "--method", "mc-moe", *CALIB],
    "compress": ["compress", "--size", "60%", *CALIB],
}
# (command, where it is killed, what the resumed run says). Each pass's resume is covered once: the calibration pass by
# calibrate, the quantisation pass by compress, by quantize (GEMQ, whose backward pass is redone) and by `run` (below),
# prune's own step (its kept statistics) by a kill while it writes, quantize's by MC-MoE's sensitivity pass and by a
# kill after every file was written.
KILLS = [
    ("calibrate", "layer-checkpointed:calibrating:1", "resuming calibrating at decoder layer 2 of 3"),
    ("prune", "shard-written", "reusing the statistics"),  # killed while writing: calibration is not repeated
    # killed in the sequential pass: the super experts found by the pass before it are kept, the pass resumes
    ("prune-sequential", "layer-checkpointed:calibrating:1", "resuming calibrating at decoder layer 2 of 3"),
    ("quantize-mc-moe", "layer-checkpointed:sensitivity:1", "resuming sensitivity at decoder layer 2 of 3"),
    ("quantize", "layer-checkpointed:quantizing:1", "resuming quantizing at decoder layer 2 of 3"),
    ("compress", "layer-checkpointed:quantizing:1", "resuming quantizing at decoder layer 2 of 3"),
    ("quantize", "before-rename", "quantizing: the pass had finished"),  # every file written, the folder not renamed
]


def moecompress(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("MOECOMPRESS_FAULT", None)
    if fault is not None:
        env["MOECOMPRESS_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "moecompress", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("resume") / "model")


@pytest.fixture(scope="module")
def uninterrupted(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """Each command's output, run once without interruption."""
    root = tmp_path_factory.mktemp("uninterrupted")
    out = {}
    for name, args in COMMANDS.items():
        done = moecompress([args[0], str(checkpoint), *args[1:], "-o", str(root / name)])
        assert done.returncode == 0, done.stderr[-2000:]
        out[name] = _contents(root / name)
    return out


@pytest.mark.parametrize(("command", "fault", "said"), KILLS, ids=[f"{c}-{f}" for c, f, _ in KILLS])
def test_resumed_run_writes_what_an_uninterrupted_run_writes(command: str, fault: str, said: str,
                                                              checkpoint: Path, uninterrupted: dict,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [COMMANDS[command][0], str(checkpoint), *COMMANDS[command][1:], "-o", str(out)]
    killed = moecompress(args, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists() and (resume_folder(out) / INCOMPLETE_MARKER).is_file()
    resumed = moecompress([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert said in resumed.stderr
    assert not resume_folder(out).exists(), "the checkpoints outlived the finished output"
    got, want = _contents(out), uninterrupted[command]
    assert got.keys() == want.keys()
    assert [name for name in want if got[name] != want[name]] == []


def test_resume_refuses_other_options_and_keeps_the_checkpoints(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["calibrate", str(checkpoint), *CALIB, "-o", str(out)]
    assert moecompress(args, fault="layer-checkpointed:calibrating:0").returncode == -signal.SIGKILL
    other = moecompress(["calibrate", str(checkpoint), "--samples", "3", "--seq-len", "16", "-o", str(out),
                         "--resume"])
    assert other.returncode == 2
    assert error_lines(other.stderr) == [
        f"error: the unfinished run in {resume_folder(out)} was started with other options (samples: 2, now 3); "
        "give the same command and inputs with --resume, or drop --resume to start over"]
    assert (resume_folder(out) / "calibrating.safetensors").is_file()
    fresh = moecompress(args)  # without --resume: starts over, saying what it discards
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "discarding the checkpoints of an unfinished run" in fresh.stderr
    assert out.is_dir() and not resume_folder(out).exists()


def test_resume_with_nothing_to_resume_runs_from_the_start(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = moecompress(["calibrate", str(checkpoint), *CALIB, "-o", str(out), "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nothing to resume" in done.stderr
    assert (out / "stats.safetensors").is_file()


RECIPE = """\
version: 1
model: {model}
calibration:
  samples: 2
  seq_len: 16
steps:
  - op: calibrate
  - op: prune
    method: frequency
    ratio: 0.5
  - op: quantize
    bits: 3
"""


def test_run_resume_continues_the_interrupted_step_from_its_layer(checkpoint: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=checkpoint))
    whole = moecompress(["run", str(recipe), "-o", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    run = tmp_path / "run"
    killed = moecompress(["run", str(recipe), "-o", str(run)], fault="layer-checkpointed:quantizing:1")
    assert killed.returncode == -signal.SIGKILL
    resumed = moecompress(["run", str(recipe), "-o", str(run), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming quantizing at decoder layer 2 of 3" in resumed.stderr
    for step in ("00-calibrate", "01-prune", "02-quantize"):  # the same files but for the run folder's name in them
        got = _contents(run / step)
        want = _contents(tmp_path / "whole" / step)
        assert got.keys() == want.keys(), step
        moved = {name: json.loads(json.dumps(value).replace(str(tmp_path / "whole"), str(run)))
                 if not isinstance(value, bytes) else value.replace(str(tmp_path / "whole").encode(), str(run).encode())
                 for name, value in want.items()}
        assert [name for name in want if got[name] != moved[name]] == [], step
    assert not any(p.name.endswith(".resume") for p in run.iterdir())


def _tensors(count: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"t{i:02d}": torch.randn(4 + i, 8, generator=generator) for i in range(count)}


def test_shard_writer_restored_after_it_finished_writes_the_same_files(tmp_path: Path) -> None:
    """Killed after `finish()` renamed the shards (before the folder's rename): restored, it writes them again."""
    tensors = _tensors(12)
    names = list(tensors)
    (tmp_path / "whole").mkdir()
    whole = ShardWriter(tmp_path / "whole", max_shard_bytes=700)
    whole.add_all(tensors)
    whole.finish()
    folder = tmp_path / "resumed"
    folder.mkdir()
    first = ShardWriter(folder, max_shard_bytes=700)
    for name in names[:7]:
        first.add(name, tensors[name])
    state = first.state()
    for name in names[7:]:
        first.add(name, tensors[name])
    first.finish()
    second = ShardWriter(folder, max_shard_bytes=700)
    second.restore(state)
    for name in names[7:]:
        second.add(name, tensors[name])
    second.finish()
    expected = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == expected


@pytest.mark.parametrize("crash_after", [0, 3, 5, 6, 9, 11])
def test_shard_writer_restored_from_its_state_writes_the_same_files(crash_after: int, tmp_path: Path) -> None:
    """A writer killed after tensor `crash_after` (its state taken after tensor 2 or 6) is continued exactly.

    Shards hold about three tensors, so the crash falls before the state's shard closes, after
    it closed (its spool gone), or a shard later; every case must end in the same files.
    """
    tensors = _tensors(12)
    names = list(tensors)
    whole = ShardWriter(tmp_path / "whole", max_shard_bytes=700)
    (tmp_path / "whole").mkdir()
    whole.add_all(tensors)
    whole.finish()
    folder = tmp_path / "resumed"
    folder.mkdir()
    first = ShardWriter(folder, max_shard_bytes=700)
    at = 2 if crash_after < 6 else 6
    for name in names[: at + 1]:
        first.add(name, tensors[name])
    state = first.state()
    for name in names[at + 1 : crash_after + 1]:
        first.add(name, tensors[name])
    if first._spool is not None:
        first._spool.flush()  # a kill loses Python's buffer, never what reached the file
    del first
    second = ShardWriter(folder, max_shard_bytes=700)
    second.restore(state)
    for name in names[at + 1 :]:
        second.add(name, tensors[name])
    second.finish()
    expected = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == expected
