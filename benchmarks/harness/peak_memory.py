"""Peak memory of a piece of work, two ways: live CPU tensor bytes, and peak RSS of this process.

* `tensor_peak`: runs the work under `torch.profiler` with ``profile_memory=True`` and
  replays the allocation record: every operator's net self allocation at its start time plus
  the allocations and frees made outside operators (``[memory]`` events, e.g. a tensor freed
  when Python drops it). The running sum's maximum is the peak of live tensor bytes above
  what was alive when the work started (torch's CPU allocations are invisible to tracemalloc).
  Transients inside one operator are netted, so it is the peak at operator granularity.
* `RssSampler`: a thread sampling the anonymous (``RssAnon``: heap, tensors) and file-backed
  (``RssFile``: memory-mapped files such as safetensors shards, shared libraries) parts of RSS
  every few milliseconds and keeping each one's maximum. The kernel has no high-water mark for
  the two parts; file-backed pages are clean and can be dropped under memory pressure, while
  anonymous ones cannot, so the split says how much memory a run really needs.
* `reset_peak_rss` / `peak_rss` / `current_rss`: Linux's per-process high-water mark
  (``VmHWM``), which writing ``5`` to ``/proc/self/clear_refs`` resets to the current RSS, so
  the peak of one step can be read in a process that did other work first. This counts
  everything the process maps (allocator slack included); run each measured step in a fresh
  process so earlier work's freed-but-retained heap does not hide it.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def tensor_peak(work: Callable[[], T]) -> tuple[T, int]:
    """(work's result, peak live CPU tensor bytes allocated during it, above its starting point)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = work()
    deltas = []
    for event in prof.events():
        change = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if change:
            deltas.append((event.time_range.start, change))
    deltas.sort(key=lambda item: item[0])  # stable: events at the same microsecond keep record order
    live = peak = 0
    for _, change in deltas:
        live += change
        peak = max(peak, live)
    return result, peak


def _field_kib(text: str, field: str) -> int | None:
    """A "Field:   123 kB" line of /proc/self/status text, in KiB (None when absent)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.MULTILINE)
    return None if match is None else int(match.group(1))


def _status_kib(field: str) -> int:
    value = _field_kib(_STATUS.read_text(), field)
    if value is None:
        raise RuntimeError(f"{field} not found in {_STATUS}")
    return value


def rss_supported() -> bool:
    """True where this process can read and reset its RSS high-water mark (Linux)."""
    return _STATUS.is_file() and _CLEAR_REFS.exists()


def current_rss() -> int:
    """Resident set size of this process now, bytes."""
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Highest resident set size of this process since start or since the last `reset_peak_rss`, bytes."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark to its current RSS."""
    _CLEAR_REFS.write_text("5")


class RssSampler:
    """Peaks of RssAnon and RssFile of this process, sampled by a daemon thread (bytes)."""

    FIELDS = ("RssAnon", "RssFile")

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peaks = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def start(self) -> RssSampler:
        """Take a first sample, then keep sampling in the background."""
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> None:
        """Read both fields once and update the peaks."""
        text = _STATUS.read_text()
        for field in self.FIELDS:
            kib = _field_kib(text, field)
            if kib is not None:
                self.peaks[field] = max(self.peaks[field], kib * 1024)

    def stop(self) -> dict[str, int]:
        """Stop sampling (after one last sample); {"anon": bytes, "file": bytes} peaks."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()
        return {"anon": self.peaks["RssAnon"], "file": self.peaks["RssFile"]}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
