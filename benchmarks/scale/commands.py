"""The moecompress commands the ``scale`` suite measures, as data.

Each entry is a label and an argv template (`{ckpt}`: the checkpoint folder, `{out}`: a fresh
output folder) for `python -m moecompress`. Adding a command is one line; `enabled=False`
keeps it listed (and reported as pending) without running it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

CALIB = ("--samples", "8", "--seq-len", "256")
# quantize and compress read the checkpoint layer by layer (docs/engine.md), but one Qwen3-shaped MoE layer takes
# tens of minutes of MC-MoE sensitivity (RTN candidates) and batched GPTQ on this 2-core CPU: timing them at two
# depths and under several caps would take hours, so they are listed without being run.
NOT_RUN_AT_SCALE = "not run: streams layer by layer, but too slow at this shape on this CPU for the suite"


@dataclass(frozen=True)
class Command:
    """One CLI invocation to measure."""

    label: str
    template: tuple[str, ...]
    enabled: bool = True
    note: str = ""
    size_sweep: bool = False  # also timed at every sweep depth, for the time-size exponent

    def argv(self, ckpt: Path, out: Path) -> list[str]:
        """The full argv: this interpreter running `-m moecompress` with the template filled in."""
        return [sys.executable, "-m", "moecompress",
                *(part.format(ckpt=str(ckpt), out=str(out)) for part in self.template)]

    def text(self) -> str:
        """The command as a user would type it."""
        return "moecompress " + " ".join(self.template).replace("{ckpt}", "CKPT").replace("{out}", "OUT")


COMMANDS: tuple[Command, ...] = (
    Command("calibrate", ("calibrate", "{ckpt}", "-o", "{out}", *CALIB), size_sweep=True),
    Command("prune frequency", ("prune", "{ckpt}", "--method", "frequency", "--ratio", "0.5", *CALIB, "-o", "{out}"),
            size_sweep=True),
    Command("prune reap", ("prune", "{ckpt}", "--method", "reap", "--ratio", "0.5", *CALIB, "-o", "{out}")),
    Command("prune easy_ep", ("prune", "{ckpt}", "--method", "easy_ep", "--ratio", "0.5", *CALIB, "-o", "{out}")),
    Command("quantize 2.5 bits", ("quantize", "{ckpt}", "--bits", "2.5", "--samples", "8", "-o", "{out}"),
            enabled=False, note=NOT_RUN_AT_SCALE),
    Command("compress 40%", ("compress", "{ckpt}", "--size", "40%", "-o", "{out}"),
            enabled=False, note=NOT_RUN_AT_SCALE),
)
