"""Perplexity per domain on fixed, non-overlapping token windows.

For a window of S tokens x_1..x_S the model predicts x_2..x_S; its negative log-likelihood is

    NLL = - sum_{t=2..S} log p(x_t | x_1..x_{t-1})

and a domain's perplexity over all its windows is exp(sum NLL / number of predicted tokens).
Each window is scored independently (no context carried over), so results depend only on the
window length, the text and the model. Windows are the first `max_windows` of the domain's
token stream, in order, so two runs (and two models sharing a tokenizer) see the same tokens.
Sums are accumulated in float64.

Under torchrun every rank scores its share of each domain's windows and the sums are
all-reduced (`_domain_nll`), so every rank holds the whole report.

With a `CheckpointReader` (`eval --streaming`) the windows go through the layer engine: every
batch is embedded, then each decoder layer is read once and run on every batch, and the
model's own forward finishes each batch from its last hidden state (final norm, head, any
logit scaling), so the checkpoint is read once whatever the number of windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moecompress.errors import MoecompressError

if TYPE_CHECKING:
    from moecompress.engine.reader import CheckpointReader


def model_input_device(model: nn.Module) -> torch.device:
    """Where input ids must live: the input embedding's device (CPU for offloaded/meta ones)."""
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.device.type == "meta":
        return torch.device("cpu")
    return weight.device


def perplexity_from_nll(nll: float, tokens: int) -> float:
    """exp(nll / tokens), or inf when that overflows a float."""
    try:
        return math.exp(nll / tokens)
    except OverflowError:
        return float("inf")


def _check_vocabulary(model: nn.Module, token_windows: torch.Tensor, domain: str) -> None:
    """Raise when the tokenizer produced ids the model's embedding does not have."""
    embeddings = model.get_input_embeddings()
    size = getattr(embeddings, "num_embeddings", None)
    if size is None:
        return
    largest = int(token_windows.max())
    if largest >= size:
        raise MoecompressError(
            f"domain {domain!r}: the tokenizer produced token id {largest} but the model's vocabulary has {size} "
            "entries; use the tokenizer saved with this model"
        )


@torch.no_grad()
def window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "windows",
) -> tuple[float, int]:
    """Summed next-token NLL over windows (N, S) and the number of predicted tokens N*(S-1).

    Runs the model's own forward (so soft-capping or logit scaling are respected) on
    `batch_size` windows at a time; works with offloaded / streaming models.
    """
    from tqdm.auto import tqdm

    if windows.dim() != 2 or windows.shape[1] < 2:
        raise MoecompressError("evaluation windows must be a (N, S) tensor with S >= 2 tokens")
    if batch_size < 1:
        raise MoecompressError(f"--batch-size must be at least 1 (got {batch_size})")
    device = model_input_device(model)
    total = 0.0
    tokens = 0
    count = windows.shape[0]
    with tqdm(total=count, desc=desc, unit="win", disable=not progress, leave=False) as bar:
        for start in range(0, count, batch_size):
            batch = windows[start : start + batch_size].to(device)  # (B, S)
            logits = model(input_ids=batch, use_cache=False).logits  # (B, S, V)
            batch_total, batch_tokens = _add_window_losses(logits, batch)
            total += batch_total
            tokens += batch_tokens
            bar.update(batch.shape[0])
    return total, tokens


def _add_window_losses(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of logits (B, S, V) for token ids (B, S), one row at a time (small log-softmax)."""
    total, tokens = 0.0, 0
    targets = batch[:, 1:]  # (B, S-1)
    for row in range(batch.shape[0]):
        losses = nn.functional.cross_entropy(logits[row, :-1].float(), targets[row].to(logits.device),
                                             reduction="none")  # (S-1,)
        total += float(losses.double().sum())
        tokens += int(losses.numel())
    return total, tokens


@torch.no_grad()
def streamed_window_nll(reader: CheckpointReader, windows: torch.Tensor, batch_size: int = 8,
                        progress: bool = True, desc: str = "windows") -> tuple[float, int]:
    """`window_nll` for a checkpoint read one decoder layer at a time (each layer read once for all windows)."""
    from tqdm.auto import tqdm

    from moecompress.engine.backward import head_in_its_dtype, replay_decoder
    from moecompress.engine.layers import LayerEngine

    if windows.dim() != 2 or windows.shape[1] < 2:
        raise MoecompressError("evaluation windows must be a (N, S) tensor with S >= 2 tokens")
    if batch_size < 1:
        raise MoecompressError(f"--batch-size must be at least 1 (got {batch_size})")
    engine = LayerEngine.from_reader(reader)
    batches = [("eval", windows[start : start + batch_size]) for start in range(0, windows.shape[0], batch_size)]
    engine.prepare(batches)
    for index in tqdm(range(len(engine.layers)), desc=desc, unit="layer", disable=not progress, leave=False):
        engine.run_layer(index)
    total, tokens = 0.0, 0
    with engine.outside_layers_loaded(include_head=True), head_in_its_dtype(reader.model):
        for (_, ids), batch in zip(batches, engine.batches):
            logits = replay_decoder(reader.model, engine.layers, batch.hidden.to(engine.device),
                                    input_ids=ids.to(engine.device)).logits  # (B, S, V)
            batch_total, batch_tokens = _add_window_losses(logits, ids)
            total += batch_total
            tokens += batch_tokens
    return total, tokens


def _domain_nll(model: nn.Module, reader: CheckpointReader | None, domain_windows: torch.Tensor, batch_size: int,
                progress: bool, desc: str) -> tuple[float, int]:
    """(summed NLL, predicted tokens) of a domain's windows (N, S); under torchrun, of every rank's share, summed.

    Ranks take the windows round-robin (every world-size-th from their rank, as `distributed.shard`
    splits a list) and all-reduce the two sums in float64, so every rank returns the
    single-process totals up to the order of the additions.
    """
    from moecompress.engine import distributed

    share = domain_windows[distributed.rank()::distributed.world_size()]  # (N_rank, S)
    nll, tokens = 0.0, 0
    with distributed.phase(f"evaluating {desc}"):
        if share.shape[0] and reader is None:
            nll, tokens = window_nll(model, share, batch_size=batch_size, progress=progress, desc=desc)
        elif share.shape[0]:
            nll, tokens = streamed_window_nll(reader, share, batch_size=batch_size, progress=progress, desc=desc)
    if distributed.active():
        summed = distributed.all_reduce_(torch.tensor([nll, float(tokens)], dtype=torch.float64))  # (2,)
        nll, tokens = float(summed[0]), int(summed[1])
    return nll, tokens


@dataclass
class DomainResult:
    """Perplexity of one domain: exp(nll / tokens) over `windows` windows."""

    domain: str
    perplexity: float
    nll: float  # summed negative log-likelihood (nats)
    tokens: int  # predicted tokens: windows * (seq_len - 1)
    windows: int

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens


@dataclass
class EvalReport:
    """Per-domain perplexities of one model under one protocol (window length and count)."""

    results: list[DomainResult]
    seq_len: int
    max_windows: int
    model_path: str | None = None
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_perplexity(self) -> float:
        """Unweighted mean of the domains' perplexities (each domain counts once)."""
        if not self.results:
            return float("nan")
        return sum(r.perplexity for r in self.results) / len(self.results)

    def domain(self, name: str) -> DomainResult:
        """The result for one domain by name."""
        for result in self.results:
            if result.domain == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with per-domain results and the mean perplexity."""
        return {
            "model_path": self.model_path,
            "seq_len": self.seq_len,
            "max_windows": self.max_windows,
            "mean_perplexity": self.mean_perplexity,
            "domains": [asdict(r) for r in self.results],
            "seconds": self.seconds,
            **self.extra,
        }


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any,
    sources: list[Any],
    seq_len: int = 256,
    max_windows: int = 32,
    batch_size: int = 8,
    progress: bool = True,
    reader: CheckpointReader | None = None,
) -> EvalReport:
    """Perplexity of `model` on each domain source: its first `max_windows` windows of `seq_len`.

    sources: `DomainSource`s (see `moecompress.calibration.data`). A domain with fewer than
    `max_windows` windows is scored on all it has (the report records the count); one with
    less than one full window of text is an error. reader: the checkpoint `model` (a meta
    skeleton) is read from, one decoder layer at a time (`streamed_window_nll`). The report's
    `model_path` is left for the caller, which knows what folder it opened.
    """
    from moecompress.calibration.data import read_texts, token_stream, windows

    if seq_len < 2:
        raise MoecompressError(f"--seq-len must be at least 2 (got {seq_len})")
    if max_windows < 1:
        raise MoecompressError(f"--windows must be at least 1 (got {max_windows})")
    if not sources:
        raise MoecompressError("no evaluation data; pass --data NAME=PATH")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise MoecompressError(
            f"--seq-len {seq_len} is longer than the model's max_position_embeddings ({limit}); use --seq-len {limit}"
        )
    names = [source.name for source in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MoecompressError(f"domain name(s) {', '.join(duplicates)} given twice; name each --data NAME=PATH uniquely")
    started = time.perf_counter()
    results = []
    for source in sources:
        stream = token_stream(tokenizer, read_texts(source))  # (L,)
        available = stream.numel() // seq_len
        if available == 0:
            raise MoecompressError(
                f"domain {source.name!r} ({source.path}) has {stream.numel()} tokens, fewer than one "
                f"window of {seq_len}; add text or lower --seq-len"
            )
        domain_windows = windows(stream, seq_len, count=min(max_windows, available), seed=None)  # (N, S)
        _check_vocabulary(model, domain_windows, source.name)
        nll, tokens = _domain_nll(model, reader, domain_windows, batch_size, progress, source.name)
        results.append(
            DomainResult(
                domain=source.name,
                perplexity=perplexity_from_nll(nll, tokens),
                nll=nll,
                tokens=tokens,
                windows=int(domain_windows.shape[0]),
            )
        )
    return EvalReport(
        results=results,
        seq_len=seq_len,
        max_windows=max_windows,
        seconds=time.perf_counter() - started,
    )
