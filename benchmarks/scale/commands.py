"""The moecompress commands the ``scale`` suite measures, as data.

Each entry is a label and an argv template (`{ckpt}`: the checkpoint folder, `{out}`: a fresh
output folder) for `python -m moecompress`. Adding a command is one line; `enabled=False`
keeps it listed (and reported as pending) without running it.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path

CALIB = ("--samples", "8", "--seq-len", "256")
# quantize and compress take about 2 and 4 minutes per Qwen3-30B-A3B-shaped layer on this 2-core CPU (MC-MoE
# sensitivity, batched GPTQ): they are timed at 2 and 4 layers and run once at 8 layers under the cap the layer-engine
# issue sets for them (0.4x), which is also their 8-layer time, instead of a search over every cap.
SLOW_TIMING_DEPTHS = (2, 4)
SLOW_CAPS = (0.4,)


@dataclass(frozen=True)
class Command:
    """One CLI invocation to measure."""

    label: str
    template: tuple[str, ...]
    enabled: bool = True
    note: str = ""
    size_sweep: bool = False  # also timed at every sweep depth, for the time-size exponent
    timing_depths: tuple[int, ...] | None = None  # its own uncapped depths (default: the suite's)
    cap_fractions: tuple[float, ...] | None = None  # its own caps, tried at the cap depth without an uncapped run there
    ranks: int = 1  # processes under torchrun (gloo on this CPU); 1: a plain process
    capped: bool = True  # False: timed only, no cap search

    def argv(self, ckpt: Path, out: Path) -> list[str]:
        """The full argv: this interpreter running `-m moecompress` (under torchrun with ranks) with the template filled in."""
        launcher = [sys.executable]
        if self.ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(self.ranks), "--master-addr",
                         "127.0.0.1", "--master-port", str(_free_port())]
        return [*launcher, "-m", "moecompress", *(part.format(ckpt=str(ckpt), out=str(out)) for part in self.template)]

    def text(self) -> str:
        """The command as a user would type it."""
        launcher = f"torchrun --nproc-per-node {self.ranks} -m moecompress " if self.ranks > 1 else "moecompress "
        return launcher + " ".join(self.template).replace("{ckpt}", "CKPT").replace("{out}", "OUT")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


COMMANDS: tuple[Command, ...] = (
    Command("calibrate", ("calibrate", "{ckpt}", "-o", "{out}", *CALIB), size_sweep=True),
    Command("prune frequency", ("prune", "{ckpt}", "--method", "frequency", "--ratio", "0.5", *CALIB, "-o", "{out}"),
            size_sweep=True),
    Command("prune reap", ("prune", "{ckpt}", "--method", "reap", "--ratio", "0.5", *CALIB, "-o", "{out}")),
    Command("prune easy_ep", ("prune", "{ckpt}", "--method", "easy_ep", "--ratio", "0.5", *CALIB, "-o", "{out}")),
    # "quantize 2.5 bits" ran as `quantize CKPT --bits 2.5` while MC-MoE was the default method (its stored rows, at
    # 0279816); GEMQ, the default since its backward pass streams, is measured beside it under the same cap
    Command("quantize 2.5 bits", ("quantize", "{ckpt}", "--bits", "2.5", "--method", "mc-moe", "--samples", "8",
                                  "-o", "{out}"),
            timing_depths=SLOW_TIMING_DEPTHS, cap_fractions=SLOW_CAPS),
    Command("quantize 2.5 bits, gemq", ("quantize", "{ckpt}", "--bits", "2.5", "--method", "gemq", "--samples", "8",
                                        "-o", "{out}"),
            timing_depths=(2,), cap_fractions=SLOW_CAPS),
    Command("compress 40%", ("compress", "{ckpt}", "--size", "40%", "--samples", "8", "-o", "{out}"),
            timing_depths=SLOW_TIMING_DEPTHS, cap_fractions=SLOW_CAPS),
    # the same quantisation over 2 ranks (one thread each, as torchrun sets): against "quantize 2.5 bits" at 2 layers
    Command("quantize 2.5 bits, 2 ranks", ("quantize", "{ckpt}", "--bits", "2.5", "--method", "mc-moe", "--samples",
                                           "8", "-o", "{out}"),
            timing_depths=(2,), ranks=2, capped=False),
)
