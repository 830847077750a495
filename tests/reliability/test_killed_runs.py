"""A run killed outright (SIGKILL) leaves no output, or a hidden folder marked unfinished that nothing reads.

`MOECOMPRESS_FAULT=<point>` makes the child kill itself with SIGKILL at a named point
(`moecompress.io.output.fault_point`): right after the temporary output folder is created,
after the first shard is written, and just before the rename. A kill during calibration (a
shorter timer) is covered too. After each kill:

* the output path does not exist;
* any temporary sibling holds the `MOECOMPRESS_INCOMPLETE` marker, and `inspect` (a checkpoint)
  or `prune --stats` (statistics) pointed at it exits 2 with one line saying it is unfinished;
* the input folder is byte-identical;
* after a kill just before the rename, the same command run again completes (the leftover does
  not get in its way).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moecompress.engine.resume import resume_folder
from moecompress.unfinished import INCOMPLETE_MARKER
from tests.cli_helpers import make_checkpoint
from tests.reliability.test_bad_inputs import digest

pytestmark = pytest.mark.slow  # each test kills a real command process mid-run (10-30 s)

REPO = Path(__file__).resolve().parents[2]
CALIB = ["--samples", "2", "--seq-len", "16"]


def moecompress(args: list[str], fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("MOECOMPRESS_FAULT", None)
    if fault is not None:
        env["MOECOMPRESS_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "moecompress", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("killed") / "model")


COMMANDS = {
    "calibrate": lambda model, out: ["calibrate", str(model), *CALIB, "-o", str(out)],
    "prune": lambda model, out: ["prune", str(model), "--method", "frequency", "--ratio", "0.5", *CALIB,
                                 "-o", str(out)],
    "quantize": lambda model, out: ["quantize", str(model), "--bits", "3", *CALIB, "-o", str(out)],
}
# where each command is killed: every point for prune; calibrate (one small file, no shard of its own) and quantize
# (shards written layer by layer) at the point their writers differ from prune's (each child costs seconds)
POINTS = {"calibrate": ("before-rename",), "prune": ("output-created", "shard-written", "before-rename"),
          "quantize": ("shard-written",)}


def leftovers(out: Path) -> list[Path]:
    """Unfinished output folders of a run writing `out`: temporary siblings, or the one its checkpoints hold."""
    found = sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-"))
    return found + [p for p in (resume_folder(out) / "output",) if p.is_dir()]


@pytest.mark.parametrize(("command", "point"), [(c, p) for c, points in POINTS.items() for p in points])
def test_killed_run_leaves_nothing_that_looks_complete(command: str, point: str, checkpoint: Path,
                                                       tmp_path: Path) -> None:
    before = digest(checkpoint)
    out = tmp_path / "out"
    killed = moecompress(COMMANDS[command](checkpoint, out), fault=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    [left] = leftovers(out)
    assert (left / INCOMPLETE_MARKER).is_file()
    reader = (["prune", str(checkpoint), "--stats", str(left), "--method", "frequency", "--ratio", "0.5", "-o",
               str(tmp_path / "never")] if command == "calibrate" else ["inspect", str(left)])
    refused = moecompress(reader)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: {str(left)!r} is an unfinished moecompress output (its run was killed before it finished); "
        "delete it and run the command again"]
    assert digest(checkpoint) == before
    if point == "before-rename":  # everything was written but the rename: the rerun is not hindered by the leftover
        again = moecompress(COMMANDS[command](checkpoint, out))
        assert again.returncode == 0, again.stderr[-2000:]
        assert out.is_dir() and not (out / INCOMPLETE_MARKER).exists()


def test_kill_during_calibration_leaves_no_folder(checkpoint: Path, tmp_path: Path) -> None:
    """SIGKILL from outside while the calibration pass runs, before any output folder exists (only checkpoints)."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("MOECOMPRESS_FAULT", None)
    child = subprocess.Popen([sys.executable, "-m", "moecompress", *COMMANDS["prune"](checkpoint, out)[:-2],
                              "--samples", "64", "--seq-len", "64", "-o", str(out)], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen, deadline = b"", time.monotonic() + 120
        while b"calibrating" not in seen and time.monotonic() < deadline:  # the layer pass has started
            chunk = os.read(child.stderr.fileno(), 4096)  # progress bars end lines with \r: read bytes, not lines
            if not chunk:
                break
            seen += chunk
        assert b"calibrating" in seen, seen[-2000:]
        child.kill()
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists() and not leftovers(out)
    assert (resume_folder(out) / INCOMPLETE_MARKER).is_file()  # the checkpoints kept for --resume, marked unfinished
