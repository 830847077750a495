"""Resumable runs: checkpoints of the layer-by-layer passes, kept beside the output until it is complete.

A command that writes the folder `OUT` keeps `.OUT.resume/` next to it while it runs:

    .OUT.resume/
      MOECOMPRESS_INCOMPLETE       nothing reads this folder as a checkpoint
      run.json                     the command and what defines it (options, input checkpoint, data digests)
      <pass>.safetensors           after each finished decoder layer of a pass: the cached hidden states
                                   (inputs of the next layer), the torch RNG state, and the pass's running
                                   state (JSON in the metadata)
      <pass>-layer-00007.safetensors   what the pass computed for layer 7, written once when it finishes
      <result>/                    a finished stage's result (e.g. the statistics prune calibrated)
      output/                      the output being built, when a pass writes it as it goes (quantize)

Every file is written to a temporary name and renamed, so a run killed at any moment leaves
the last complete checkpoint. With `resume=True` a run whose recorded digests equal its own
continues from there: each pass restores its cached hidden states and state and starts at the
first layer it had not finished. The hidden states, sums and RNG state come back bit for bit,
so the resumed run writes the same bytes as an uninterrupted one. Without `resume`, a folder
left by an earlier run is discarded (with a warning) and the run starts over. The folder is
removed once the output is in place. Under torchrun (several processes) no checkpoint is kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moecompress.engine import distributed
from moecompress.errors import MoecompressError
from moecompress.io.output import disk_error, fault_point
from moecompress.unfinished import INCOMPLETE_MARKER

if TYPE_CHECKING:
    from moecompress.engine.layers import LayerEngine

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"
_STATE_KEY = "moecompress_state"


def resume_folder(output: str | Path) -> Path:
    """Where the checkpoints of a run writing `output` live: `.NAME.resume` beside it."""
    out = Path(output)
    return out.parent / f".{out.name}.resume"


def file_marks(path: Path) -> list[Any]:
    """(relative name, size, mtime in ns) of a file, or of every file under a folder (no byte is read)."""
    if path.is_file():
        stat = path.stat()
        return [[path.name, stat.st_size, stat.st_mtime_ns]]
    marks = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            stat = full.stat()
            marks.append([str(full.relative_to(path)), stat.st_size, stat.st_mtime_ns])
    return marks


def source_fingerprint(folder: str | Path) -> str:
    """A checkpoint folder's identity: its config's bytes and its files' names, sizes and times."""
    folder = Path(folder)
    sha = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        sha.update(config.read_bytes())
    sha.update(json.dumps(file_marks(folder)).encode())
    return sha.hexdigest()


def read_json_file(path: Path) -> Any | None:
    """The parsed JSON of `path`, or None when it is missing or not JSON (a record half written by a killed run)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename tmp onto `path`: readers see the old file or the whole new one.

    A write that fails for lack of room or permission becomes a one-line error.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise (disk_error(err, path.parent, "save the run's checkpoints in") or err) from None
    except SafetensorError as err:  # safetensors reports the OS error inside its own
        tmp.unlink(missing_ok=True)
        if f"os error {errno.ENOSPC}" not in str(err):
            raise
        raise disk_error(OSError(errno.ENOSPC, "No space left on device"), path.parent,
                         "save the run's checkpoints in") from None


@dataclass
class Restored:
    """Where a layer pass continues: its first unfinished layer, the finished layers' tensors, its state."""

    next_layer: int = 0
    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> its saved tensors
    state: dict[str, Any] = field(default_factory=dict)


class LayerPassCheckpoints:
    """Checkpoints of one layer-by-layer pass (a no-op without a folder)."""

    def __init__(self, folder: Path | None, name: str) -> None:
        self.folder = folder
        self.name = name
        self._saved_layers: list[int] = []  # layers whose own tensors are on disk

    def _state_file(self) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.name}.safetensors"

    def _layer_file(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.name}-layer-{index:05d}.safetensors"

    def restore(self, engine: LayerEngine | None = None, total: int | None = None) -> Restored:
        """The saved progress, with `engine` moved to its first unfinished layer (nothing saved: layer 0)."""
        if self.folder is None or not self._state_file().is_file():
            return Restored()
        tensors = load_file(self._state_file())
        record = json.loads(tensors.pop(_STATE_KEY).numpy().tobytes().decode())
        next_layer = int(record["next_layer"])
        hidden = [tensors[f"hidden.{i}"] for i in range(int(record["batches"]))]
        if engine is not None:
            if len(hidden) != len(engine.batches):
                raise MoecompressError(f"the checkpoint in {self.folder} holds {len(hidden)} calibration batches, this "
                                       f"run has {len(engine.batches)}; drop --resume to start over")
            engine.restart(next_layer, hidden)
        torch.set_rng_state(tensors["rng"])
        self._saved_layers = list(record["layers"])
        layers = {index: load_file(self._layer_file(index)) for index in self._saved_layers}
        if total is not None and next_layer >= total:
            log.warning("%s: the pass had finished; reusing its results (checkpoint in %s)", self.name, self.folder)
        else:
            of = f" of {total}" if total is not None else ""
            log.warning("resuming %s at decoder layer %d%s (checkpoint in %s)", self.name, next_layer, of, self.folder)
        return Restored(next_layer, layers, record["state"])

    def save(self, engine: LayerEngine | None, finished: int, layer_tensors: dict[str, torch.Tensor] | None = None,
             state: dict[str, Any] | None = None) -> None:
        """Decoder layer `finished` is done: store its tensors, the engine's cached inputs of the next, and `state`."""
        fault_point("layer-done", f"{self.name}:{finished}")
        if self.folder is None:
            return
        if layer_tensors:
            prepared = {key: value.detach().to("cpu").contiguous() for key, value in layer_tensors.items()}
            _write_atomically(self._layer_file(finished), lambda tmp: save_file(prepared, str(tmp)))
            self._saved_layers = sorted(set(self._saved_layers) | {finished})
        hidden = [batch.hidden for batch in engine.batches] if engine is not None else []
        record = {"next_layer": finished + 1, "batches": len(hidden), "layers": self._saved_layers,
                  "state": state or {}}
        tensors = {f"hidden.{i}": value.detach().to("cpu").contiguous() for i, value in enumerate(hidden)}
        tensors["rng"] = torch.get_rng_state()
        tensors[_STATE_KEY] = torch.frombuffer(bytearray(json.dumps(record).encode()), dtype=torch.uint8)
        _write_atomically(self._state_file(), lambda tmp: save_file(tensors, str(tmp)))
        fault_point("layer-checkpointed", f"{self.name}:{finished}")


class RunCheckpoints:
    """The checkpoints of one run writing `output` (see the module docstring).

    resume: continue from an earlier run's checkpoints when they are there (a warning when
    they are not); otherwise any left there are discarded. `enabled=False` (or several
    processes) keeps none: every method is then a no-op.
    """

    def __init__(self, output: str | Path, command: str, resume: bool = False, enabled: bool = True) -> None:
        self.output = Path(output)
        self.command = command
        self.resuming = False
        self._keep = False
        if distributed.launched_in_parallel():
            if resume:
                raise MoecompressError("--resume continues a run of one process; under torchrun run the command "
                                       "again without --resume")
            enabled = False
        self.folder: Path | None = resume_folder(output) if enabled else None
        self.record: dict[str, Any] = {"command": command, "identity": {}}
        if self.folder is None:
            return
        found = self._read_record()
        if resume and found is not None:
            if found.get("command") != command:
                raise MoecompressError(f"{self.folder} holds an unfinished {found.get('command')!r} run, not "
                                       f"{command!r}; drop --resume to start over")
            self.record, self.resuming = found, True
            return
        if resume:
            log.warning("nothing to resume for %s (no unfinished run left checkpoints there); starting from the "
                        "beginning", self.output)
        elif self.folder.exists():
            log.warning("discarding the checkpoints of an unfinished run in %s; pass --resume to continue such a run",
                        self.folder)
        self._reset()

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        """Success: the checkpoints go. Ctrl-C or a resume refused: they stay. Any other failure: they go."""
        if self.folder is None:
            return
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            log.warning("interrupted: the checkpoints stay in %s; run the same command with --resume to continue",
                        self.folder)
            return
        if not self._keep:
            self.finish()

    @classmethod
    def disabled(cls) -> RunCheckpoints:
        """Checkpoints that keep nothing (library calls without an output, dry runs)."""
        return cls(Path("unused"), "none", enabled=False)

    def _read_record(self) -> dict[str, Any] | None:
        assert self.folder is not None
        return read_json_file(self.folder / RUN_RECORD)

    def _reset(self) -> None:
        assert self.folder is not None
        try:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)
            (self.folder / INCOMPLETE_MARKER).write_text("Checkpoints of an unfinished moecompress run (continue it "
                                                         "with --resume, or delete this folder).\n")
        except OSError as err:
            raise (disk_error(err, self.output, "create the output folder") or err) from None
        self._write_record()

    def _write_record(self) -> None:
        assert self.folder is not None
        _write_atomically(self.folder / RUN_RECORD,
                          lambda tmp: tmp.write_text(json.dumps(self.record, indent=2, sort_keys=True) + "\n"))

    def require(self, part: str, value: Any) -> None:
        """Record `value` as part of what defines this run; resuming, refuse if the earlier run recorded another."""
        if self.folder is None:
            return
        value = json.loads(json.dumps(value, sort_keys=True, default=str))  # as it reads back from run.json
        recorded = self.record["identity"].get(part)
        if recorded is not None and _digest(recorded) == _digest(value):
            return
        if recorded is not None:
            differing = ""
            if isinstance(recorded, dict) and isinstance(value, dict):
                keys = sorted(k for k in set(recorded) | set(value) if recorded.get(k) != value.get(k))
                differing = f" ({', '.join(f'{k}: {recorded.get(k)!r}, now {value.get(k)!r}' for k in keys[:3])})"
            self._keep = True  # the earlier run's checkpoints are still good for the command that made them
            raise MoecompressError(f"the unfinished run in {self.folder} was started with other {part}{differing}; "
                                   "give the same command and inputs with --resume, or drop --resume to start over")
        self.record["identity"][part] = value
        self._write_record()

    def layer_pass(self, name: str) -> LayerPassCheckpoints:
        """The checkpoints of the layer pass `name` (e.g. "calibrating")."""
        return LayerPassCheckpoints(self.folder, name)

    def result(self, name: str) -> Path | None:
        """The folder of a finished stage's saved result, if there is one."""
        if self.folder is None or not (self.folder / name).is_dir():
            return None
        return self.folder / name

    def save_result(self, name: str, write: Callable[[Path], None]) -> None:
        """Save a finished stage's result: `write(folder)` into a temporary folder, renamed when it returns."""
        if self.folder is None:
            return
        tmp = self.folder / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        os.replace(tmp, self.folder / name)

    def output_folder(self) -> Path | None:
        """Where a pass that writes the output as it goes builds it (None: no checkpoints kept)."""
        return None if self.folder is None else self.folder / "output"

    def finish(self) -> None:
        """The output is in place: the checkpoints are no longer needed."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
