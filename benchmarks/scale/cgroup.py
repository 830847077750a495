"""Run a command in a child process under a hard memory cap (cgroup v1 memory controller).

`run_capped` makes a fresh memory cgroup, sets `memory.limit_in_bytes` (and
`memory.memsw.limit_in_bytes` where it exists, so swap cannot stretch the cap), and starts the
command through `sh`, which writes its own pid into the group's `cgroup.procs` and then `exec`s
the command: the process is capped before it imports anything. While it runs, the group's
anonymous memory (`rss` in memory.stat) is sampled; afterwards `memory.max_usage_in_bytes`,
`memory.failcnt` and the oom-kill count of `memory.oom_control` are read and the group removed.

Under the cap the kernel reclaims page cache (the memory-mapped checkpoint's clean pages) but
not anonymous memory, so a command that succeeds under a cap fits in that much memory. The
group is made inside the caller's own memory cgroup, so it stays under any limit the caller
is already under (falling back to the controller's root).

`smallest_cap` tries caps, as fractions of the checkpoint's size, and reports the smallest
that succeeded (with the failing attempt below it).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONTROLLER = Path("/sys/fs/cgroup/memory")
UNLIMITED = None
STDERR_LINES = 20
SAMPLE_SECONDS = 0.05


@dataclass
class CapResult:
    """One run of a command in its own memory cgroup."""

    argv: list[str]
    cap_bytes: int | None  # None: no limit (the group only measures)
    ok: bool
    returncode: int | None  # None when killed on timeout
    seconds: float
    cpu_seconds: float  # user + system time of the child (and of any children it waited for)
    max_usage: int  # memory.max_usage_in_bytes: peak charge, page cache included
    peak_rss: int  # sampled peak of the group's anonymous memory (memory.stat rss)
    failcnt: int  # times the group hit its limit (reclaim was forced)
    oom_kills: int
    timed_out: bool = False
    stderr_tail: list[str] = field(default_factory=list)
    stdout_tail: list[str] = field(default_factory=list)
    parsed: dict[str, Any] = field(default_factory=dict)  # what `parse_stderr` read from the whole stderr

    @property
    def outcome(self) -> str:
        """ok, oom (killed by the cgroup's OOM killer), timeout, or error (any other failure)."""
        if self.ok:
            return "ok"
        if self.timed_out:
            return "timeout"
        if self.oom_kills or self.returncode == -signal.SIGKILL:
            return "oom"
        return "error"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the outcome."""
        return {**asdict(self), "outcome": self.outcome}


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse cgroup 'key value' lines (memory.stat, memory.oom_control) into integers."""
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


def own_memory_group(proc_cgroup: str, controller: Path = CONTROLLER) -> Path:
    """The caller's memory cgroup folder from /proc/self/cgroup text (the controller root if not found)."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            folder = controller / parts[2].lstrip("/")
            if folder.is_dir():
                return folder
    return controller


def unavailable_reason(controller: Path = CONTROLLER) -> str | None:
    """Why capped runs cannot work here (None when they can): no v1 memory controller, or no write access."""
    if not (controller / "memory.limit_in_bytes").is_file():
        return f"no cgroup-v1 memory controller at {controller}"
    parent = own_memory_group(Path("/proc/self/cgroup").read_text(), controller)
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable (capped runs need root)"
    return None


class MemoryGroup:
    """A fresh memory cgroup with an optional hard limit; removed on exit."""

    def __init__(self, cap_bytes: int | None, controller: Path = CONTROLLER) -> None:
        parent = own_memory_group(Path("/proc/self/cgroup").read_text(), controller)
        self.path = parent / f"moecompress-scale-{uuid.uuid4().hex[:12]}"
        self.cap_bytes = cap_bytes

    def __enter__(self) -> MemoryGroup:
        self.path.mkdir()
        if self.cap_bytes is not None:
            memsw = self.path / "memory.memsw.limit_in_bytes"
            (self.path / "memory.limit_in_bytes").write_text(str(self.cap_bytes))
            if memsw.exists():  # memsw must stay >= the memory limit, so it is set after it
                memsw.write_text(str(self.cap_bytes))
        return self

    def read(self, name: str) -> str:
        """One control file's text."""
        return (self.path / name).read_text()

    def value(self, name: str) -> int:
        """A control file holding one integer."""
        return int(self.read(name).strip())

    def anonymous_bytes(self) -> int:
        """The group's anonymous memory now (memory.stat `rss`, which includes transparent huge pages)."""
        return parse_flat_keyed(self.read("memory.stat")).get("rss", 0)

    def __exit__(self, *exc: object) -> None:
        for _ in range(50):  # the last task may still be exiting
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        self.path.rmdir()


def _tail(path: Path, lines: int = STDERR_LINES) -> list[str]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_capped(argv: Sequence[str], cap_bytes: int | None, timeout: float, cwd: Path | None = None,
               env: dict[str, str] | None = None, parse_stderr: Callable[[str], dict[str, Any]] | None = None
               ) -> CapResult:
    """Run `argv` in a fresh memory cgroup capped at `cap_bytes` (None: uncapped, measured only).

    The child joins the group before it starts (`sh` writes its pid, then execs), runs in its
    own session (so a timeout kills its whole process group), and is given `timeout` seconds.
    CPU time is the rusage of waited-for children, so runs must not overlap in one process.
    """
    with MemoryGroup(cap_bytes) as group, tempfile.TemporaryDirectory(prefix="moecompress-cap-") as logs:
        out, err = Path(logs) / "stdout", Path(logs) / "stderr"
        wrapper = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group.path / "cgroup.procs"), *argv]
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], group.anonymous_bytes())
                except OSError:
                    pass
                done.wait(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        started, cpu_before = time.perf_counter(), _children_cpu()
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            child = subprocess.Popen(wrapper, stdout=stdout, stderr=stderr, cwd=cwd, env=env, start_new_session=True)
            sampler.start()
            timed_out = False
            try:
                returncode: int | None = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                returncode = None
        seconds, cpu_seconds = time.perf_counter() - started, _children_cpu() - cpu_before
        done.set()
        sampler.join()
        oom = parse_flat_keyed(group.read("memory.oom_control"))
        return CapResult(
            argv=list(argv), cap_bytes=cap_bytes, ok=returncode == 0, returncode=returncode, seconds=seconds,
            cpu_seconds=cpu_seconds, max_usage=group.value("memory.max_usage_in_bytes"), peak_rss=peak[0],
            failcnt=group.value("memory.failcnt"), oom_kills=oom.get("oom_kill", 0), timed_out=timed_out,
            stderr_tail=_tail(err), stdout_tail=_tail(out, 5),
            parsed=parse_stderr(err.read_text(errors="replace")) if parse_stderr else {},
        )


Runner = Callable[[Sequence[str], int | None, float], CapResult]


@dataclass
class CapSearch:
    """The smallest cap among the tried fractions under which the command succeeded."""

    fraction: float | None  # None: no tried fraction succeeded
    cap_bytes: int | None
    checkpoint_bytes: int
    attempts: list[dict[str, Any]]

    @property
    def result(self) -> dict[str, Any] | None:
        """The successful attempt at the smallest cap."""
        found = [a for a in self.attempts if a["ok"] and a["fraction"] == self.fraction]
        return found[0] if found else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def first_index_at_least(fractions: Sequence[float], checkpoint_bytes: int, hint_bytes: int | None) -> int | None:
    """Index of the smallest fraction whose cap holds `hint_bytes` (the last one when none does)."""
    if hint_bytes is None:
        return None
    for index, fraction in enumerate(fractions):
        if fraction * checkpoint_bytes >= hint_bytes:
            return index
    return len(fractions) - 1


def smallest_cap(argv_factory: Callable[[Path], Sequence[str]], checkpoint_bytes: int,
                 fractions: Sequence[float] = (0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0), timeout: float = 3600.0,
                 hint_bytes: int | None = None, runner: Runner | None = None,
                 before_each: Callable[[], None] | None = None) -> CapSearch:
    """Find the smallest `fraction` of `checkpoint_bytes` under which `argv_factory(out)` succeeds.

    Assumes success is monotone in the cap. With `hint_bytes` (e.g. an uncapped run's
    anonymous peak) the search starts at the first cap holding it and walks one fraction at a
    time towards the boundary; without it, it bisects. Each attempt writes into a fresh output
    folder that is deleted after; `before_each` runs first (e.g. to drop the checkpoint's
    cached pages, so that every attempt reads it under its own cap).
    """
    runner = runner or run_capped
    fractions = sorted(fractions)
    attempts: list[dict[str, Any]] = []
    lo, hi = -1, len(fractions)  # lo: largest index known to fail, hi: smallest known to succeed
    start = first_index_at_least(fractions, checkpoint_bytes, hint_bytes)
    probe = start if start is not None else (lo + hi) // 2
    while hi - lo > 1:
        fraction = fractions[probe]
        cap = int(fraction * checkpoint_bytes)
        scratch = Path(tempfile.mkdtemp(prefix="moecompress-cap-out-"))
        try:
            if before_each:
                before_each()
            result = runner(list(argv_factory(scratch / "out")), cap, timeout)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        attempts.append({"fraction": fraction, **result.as_dict()})
        if result.ok:
            hi = probe
        else:
            lo = probe
        if start is not None:
            probe = probe - 1 if result.ok else probe + 1
        else:
            probe = (lo + hi) // 2
    fraction = fractions[hi] if hi < len(fractions) else None
    return CapSearch(fraction=fraction, cap_bytes=None if fraction is None else int(fraction * checkpoint_bytes),
                     checkpoint_bytes=checkpoint_bytes, attempts=attempts)
