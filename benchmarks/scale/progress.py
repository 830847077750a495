"""What a moecompress command says about its own timing: the final state of its progress bars.

moecompress shows tqdm bars on stderr ("calibrating: 100%|...| 8/8 [11:04<00:00, 83.1s/layer]").
`bar_phases` keeps, for each bar description, the last state printed: items done, the total
and the elapsed seconds, so a run's layer pass can be told apart from its load and write.
"""

from __future__ import annotations

import re
from typing import Any

_BAR = re.compile(r"(?P<desc>[^\r\n|]*?):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s+\[(?P<elapsed>[\d:]+)<")


def clock_seconds(text: str) -> int:
    """tqdm's elapsed clock ("MM:SS" or "H:MM:SS") in seconds."""
    seconds = 0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def bar_phases(stderr: str) -> dict[str, Any]:
    """{"phases": {description: {"done", "total", "seconds"}}} from the last state of each progress bar."""
    phases: dict[str, dict[str, int]] = {}
    for match in _BAR.finditer(stderr):
        desc = match.group("desc").strip()
        phases[desc] = {"done": int(match.group("n")), "total": int(match.group("total")),
                        "seconds": clock_seconds(match.group("elapsed"))}
    return {"phases": phases} if phases else {}
