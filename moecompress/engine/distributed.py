"""Data parallelism over `torch.distributed`: a few helpers, each a no-op in a single process.

A run launched by ``torchrun --nproc-per-node N -m moecompress ...`` starts N identical
processes (ranks) with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in
their environment. `initialise` joins them into one process group (gloo on the CPU, NCCL when
the layers compute on CUDA); without ``WORLD_SIZE`` > 1 nothing is started and every helper
below does nothing, so a plain single process needs nothing extra.

What the ranks share (see docs/distributed.md):

* `shard` gives each rank its round-robin share of a list (the calibration batches);
* `all_reduce_` combines a tensor across ranks in place (SUM or MAX);
* `writer_only` runs a step on rank 0 alone (checking or writing the output) while the other
  ranks wait, and hands its result to every rank;
* `phase` agrees on failure: after a step that involves no communication, every rank says
  whether it failed, and when one did, every rank raises that rank's one-line message, so one
  bad rank ends the whole job with its error instead of leaving the others waiting.

What `phase` does not cover: a rank that dies without raising (killed, out of memory, a
segfault) or hangs. The others then wait in their next collective until torchrun's agent,
which watches every rank, stops them when one exits non-zero, or until the process group's
timeout. Nor does it cover a failure inside a collective itself (a lost connection): that is
torch.distributed's own error on every rank.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch

from moecompress.errors import MoecompressError

T = TypeVar("T")

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}

# How long a rank waits in a collective for the others. The longest wait is the other ranks'
# while rank 0 writes the output (a large checkpoint can take many minutes), longer than
# torch's defaults (10 minutes for NCCL, 30 for gloo).
TIMEOUT_ENV = "MOECOMPRESS_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 3 * 3600.0


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def active() -> bool:
    """True inside a process group of more than one rank."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """How many ranks take part (1 in a single process)."""
    dist = _dist()
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_writer() -> bool:
    """True on the one rank that writes outputs and prints summaries (rank 0)."""
    return rank() == 0


def launched_in_parallel() -> bool:
    """True when a launcher (torchrun) started this process as one of several, joined yet or not."""
    return active() or _requested_world() > 1


def _requested_world() -> int:
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise MoecompressError(f"WORLD_SIZE={text!r} is not a number of processes") from None


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise MoecompressError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return value


def _device_type(device: torch.device | str | None) -> str:
    text = "cpu" if device is None else str(device)
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(text).type
    except RuntimeError:
        return "cpu"  # an unknown device is refused later, with the usual message


def initialise(device: torch.device | str | None = None, quiet: bool = True) -> tuple[int, int]:
    """Join the ranks torchrun started; returns (rank, world size). Idempotent.

    Nothing happens when a process group already exists (it is used as it is) or when
    ``WORLD_SIZE`` is unset or 1 (a single process: returns (0, 1)). Otherwise every rank must
    call this (it is the rendezvous): the backend is NCCL when `device` is CUDA (each rank then
    computes on GPU ``LOCAL_RANK`` of its node) and gloo otherwise; a collective waits up to
    ``MOECOMPRESS_DISTRIBUTED_TIMEOUT`` seconds (default 3 hours). With `quiet`, ranks other
    than 0 send their standard output to the null device (rank 0 prints the summaries for the
    whole job; warnings and errors on standard error stay visible on every rank).
    """
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = _requested_world()
    if world <= 1:
        return 0, 1
    if not dist.is_available():
        raise MoecompressError(f"WORLD_SIZE={world} asks for {world} processes, but this torch build has no "
                               "torch.distributed; run a single process")
    backend = "gloo"
    if _device_type(device) == "cuda":
        if not torch.cuda.is_available():
            raise MoecompressError("--device cuda: no CUDA device is available on this machine; use --device cpu")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise MoecompressError(f"local rank {local} has no GPU of its own (this node has "
                                   f"{torch.cuda.device_count()}); start at most that many processes per node")
        torch.cuda.set_device(local)
        backend = "nccl"
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=_timeout_s()))
    except ValueError as err:  # e.g. WORLD_SIZE set by hand without the rendezvous variables torchrun sets
        raise MoecompressError(f"WORLD_SIZE={world} but the processes cannot meet ({_one_line(err)}); "
                               "launch with torchrun --nproc-per-node N -m moecompress ...") from None
    atexit.register(_shutdown)
    signal.signal(signal.SIGTERM, _stopped_by_launcher)
    if quiet and dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return dist.get_rank(), dist.get_world_size()


def _stopped_by_launcher(signum: int, frame: Any) -> None:
    """SIGTERM from torchrun, which stops every rank when one fails: unwind, so no half-written output stays."""
    if _EXITING:
        os._exit(1)  # already on the way out (the error was reported): nothing left to unwind
    raise SystemExit("error: stopped because another process of this torchrun job failed (the launcher's report "
                     "below names it); nothing was written")


_EXITING = False  # set once the process is shutting down


def _shutdown() -> None:
    global _EXITING
    _EXITING = True
    dist = _dist()
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: every world_size-th item from position rank (round-robin).

    Deterministic (the same on every call and every run), disjoint across ranks, and together
    exactly `items`; the whole list in a single process.
    """
    return list(items[rank()::world_size()])


_TRAFFIC = {"collectives": 0, "bytes": 0}  # what this rank has sent into collectives since it joined


def traffic() -> dict[str, int]:
    """Collectives this rank took part in and the bytes it contributed (tensors, and pickled objects gathered)."""
    return dict(_TRAFFIC)


def _count(nbytes: int) -> None:
    _TRAFFIC["collectives"] += 1
    _TRAFFIC["bytes"] += int(nbytes)


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where the backend reduces: the rank's GPU for NCCL, host memory for gloo."""
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Combine `tensor` over all ranks in place (op: "sum", "max" or "min") and return it.

    Every rank must call it with a tensor of the same shape and dtype; the tensor is moved to
    the backend's device for the reduction and back. A no-op in a single process.
    """
    return _reduce(tensor, op, None)


def reduce_(tensor: torch.Tensor, dst: int, op: str = "sum") -> torch.Tensor:
    """Combine `tensor` over all ranks into rank `dst`'s copy in place (the others' are left as they were).

    Every rank must call it with a tensor of the same shape and dtype and the same `dst`. A
    no-op in a single process.
    """
    return _reduce(tensor, op, dst)


def _reduce(tensor: torch.Tensor, op: str, dst: int | None) -> torch.Tensor:
    """`all_reduce_` (dst None) or `reduce_` to rank `dst`: the tensor goes to the backend's device and back."""
    if op not in _OPS:
        raise ValueError(f"unknown reduction {op!r}; use one of {', '.join(_OPS)}")
    if not active():
        return tensor
    dist = _dist()
    where = _comm_device(tensor)
    work = tensor if tensor.device == where and tensor.is_contiguous() else tensor.to(where).contiguous()
    _count(work.numel() * work.element_size())
    reduce_op = getattr(dist.ReduceOp, _OPS[op])
    with _peers_alive():
        if dst is None:
            dist.all_reduce(work, op=reduce_op)
        else:
            dist.reduce(work, dst=dst, op=reduce_op)
    if work is not tensor and (dst is None or rank() == dst):
        tensor.copy_(work)
    return tensor


@contextlib.contextmanager
def _peers_alive() -> Iterator[None]:
    """A collective whose peer died (killed, out of memory) fails here in one line instead of a backend traceback."""
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistBackendError and the backends' own errors
        raise MoecompressError(f"lost contact with another process of this torchrun job while communicating "
                               f"({_one_line(err)[:160]}): it failed or was killed, and the launcher's report names "
                               "it; nothing was written") from None


def barrier() -> None:
    """Wait until every rank gets here (a no-op in a single process)."""
    if active():
        dist = _dist()
        with _peers_alive():
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    if isinstance(err, MoecompressError):
        return line
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def agree(error: BaseException | None, what: str) -> None:
    """Collective: tell every rank whether this one failed at `what`; raise if another did.

    Returns on every rank when none failed. When some did, a rank that failed returns (it
    re-raises its own error, see `phase`) and every other rank raises a `MoecompressError`
    with the lowest failing rank's one-line message. A no-op in a single process.
    """
    if not active():
        return
    dist = _dist()
    lines: list[str | None] = [None] * dist.get_world_size()
    with _peers_alive():
        dist.all_gather_object(lines, None if error is None else _one_line(error))
    if error is not None:
        return
    for index, line in enumerate(lines):
        if line is not None:
            raise MoecompressError(f"{line} (on rank {index} of {len(lines)}, while {what})")


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
    """A step every rank runs without communicating, then agrees on (`agree`).

    A rank whose step raised re-raises its own exception; the other ranks raise its message.
    The block must not communicate itself (no collective inside): a rank that failed early
    would meet the others in a different collective. KeyboardInterrupt is not shared (torchrun
    stops every rank on a signal). A plain context in a single process.
    """
    try:
        yield
    except Exception as err:
        agree(err, what)
        raise
    agree(None, what)


def writer_only(step: Callable[[], T], what: str) -> T:
    """Run `step` on rank 0 alone, every rank waiting; returns its result on every rank.

    Every rank first waits for all the others (so each has finished its own checks before
    rank 0 writes anything), then rank 0 runs `step` while the others wait; a failure there
    ends every rank with rank 0's message (`phase`), and the result (which must pickle) is
    broadcast. In a single process it simply runs `step`.
    """
    if not active():
        return step()
    barrier()
    result: list[Any] = [None]
    with phase(what):
        if is_writer():
            result[0] = step()
    with _peers_alive():
        _dist().broadcast_object_list(result, src=0)
    return result[0]


def broadcast_object(value: T) -> T:
    """Rank 0's `value` (which must pickle) on every rank; collective. Returns `value` in a single process."""
    if not active():
        return value
    box: list[Any] = [value if is_writer() else None]
    with _peers_alive():
        _dist().broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value: T) -> list[T]:
    """Every rank's `value` (which must pickle), in rank order, on every rank; collective. `[value]` in one process."""
    if not active():
        return [value]
    gathered: list[Any] = [None] * world_size()
    _count(len(pickle.dumps(value)))
    with _peers_alive():
        _dist().all_gather_object(gathered, value)
    return gathered
