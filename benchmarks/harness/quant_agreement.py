"""Perplexity, KL divergence and top-1 agreement of a quantised model against the unquantised one.

On the protocol's test windows (the same ones `Fixture.evaluate` scores: the first `windows`
non-overlapping windows of `seq_len` tokens per domain), for every predicted position t of a
window (t = 1..S-1, predicting token t+1):

    NLL      = - sum_t log q(x_{t+1} | x_<=t)                      perplexity = exp(NLL / tokens)
    KL       = mean_t sum_v p(v | x_<=t) (log p(v | x_<=t) - log q(v | x_<=t))     (nats/token)
    top-1    = mean_t [argmax_v p(v | x_<=t) == argmax_v q(v | x_<=t)]

with p the unquantised model and q the quantised one. One forward pass per model gives all
three. The unquantised model's log-probabilities are computed once per fixture and kept in
float16 (N, S-1, V) per domain (about 400 MB for 3 x 64 windows of 256 tokens, vocabulary
4096); their rounding error (relative 2^-11 on each log-probability) averages out over the
tokens: the KL of the unquantised model against its own stored reference is below 1e-5.
Perplexity sums are accumulated in float64, as in `moecompress.evaluate`; the suite checks that
the unquantised model's perplexities here equal `Fixture.evaluate`'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.harness.context import Fixture


def evaluation_windows(fixture: Fixture) -> dict[str, torch.Tensor]:
    """Domain -> (N, S) token windows, exactly those `Fixture.evaluate` scores."""
    from moecompress.calibration.data import read_texts, token_stream, windows

    protocol = fixture.protocol
    out = {}
    for source in fixture.test_sources():
        stream = token_stream(fixture.tokenizer, read_texts(source))  # (L,)
        available = stream.numel() // protocol.seq_len
        out[source.name] = windows(stream, protocol.seq_len, count=min(protocol.windows, available), seed=None)
    return out


@dataclass
class Reference:
    """The unquantised model's next-token log-probabilities on the test windows."""

    windows: dict[str, torch.Tensor]  # domain -> (N, S) token ids
    log_probs: dict[str, torch.Tensor]  # domain -> (N, S-1, V) float16
    top1: dict[str, torch.Tensor]  # domain -> (N, S-1) most likely next token, from the float32 log-probabilities
    batch_size: int


def _batches(model: nn.Module, windows: torch.Tensor, batch_size: int
             ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start row, (B, S-1, V) float32 log-probabilities, (B, S-1) next tokens) per batch."""
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]  # (B, S)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, S-1, V)
        yield start, torch.log_softmax(logits, dim=-1), batch[:, 1:]


@torch.no_grad()
def reference_pass(model: nn.Module, windows: dict[str, torch.Tensor], batch_size: int) -> Reference:
    """Run the unquantised model once and keep its log-probabilities (float16)."""
    log_probs, top1 = {}, {}
    for domain, rows in windows.items():
        stored = None
        best = torch.empty((rows.shape[0], rows.shape[1] - 1), dtype=torch.long)  # (N, S-1)
        for start, logp, _ in _batches(model, rows, batch_size):
            if stored is None:
                stored = torch.empty((rows.shape[0], *logp.shape[1:]), dtype=torch.float16)  # (N, S-1, V)
            stored[start:start + logp.shape[0]] = logp.half()
            best[start:start + logp.shape[0]] = logp.argmax(-1)  # before rounding: no float16 ties
        log_probs[domain], top1[domain] = stored, best
    return Reference(windows=windows, log_probs=log_probs, top1=top1, batch_size=batch_size)


@torch.no_grad()
def score(model: nn.Module, reference: Reference) -> dict[str, Any]:
    """Per-domain perplexity, KL to the reference and top-1 agreement, plus their means over domains.

    Returns {"domains": [{domain, perplexity, nll, tokens, windows, kl, top1}], "mean_perplexity",
    "kl", "top1"} (means unweighted over domains; every domain has the same token count when
    it has the protocol's window count).
    """
    model.eval()
    domains = []
    for domain, rows in reference.windows.items():
        nll = kl = agree = 0.0
        tokens = 0
        for start, logq, targets in _batches(model, rows, reference.batch_size):
            logp = reference.log_probs[domain][start:start + logq.shape[0]].float()  # (B, S-1, V)
            nll -= float(logq.gather(-1, targets[..., None]).double().sum())
            kl += float((logp.exp() * (logp - logq)).sum(-1).double().sum())
            best = reference.top1[domain][start:start + logq.shape[0]]  # (B, S-1)
            agree += float((best == logq.argmax(-1)).double().sum())
            tokens += targets.numel()
        domains.append({"domain": domain, "perplexity": _exp(nll / tokens), "nll": nll, "tokens": tokens,
                        "windows": int(rows.shape[0]), "kl": kl / tokens, "top1": agree / tokens})
    return {
        "domains": domains,
        "mean_perplexity": sum(d["perplexity"] for d in domains) / len(domains),
        "kl": sum(d["kl"] for d in domains) / len(domains),
        "top1": sum(d["top1"] for d in domains) / len(domains),
    }


def check_matches_evaluate(ours: dict[str, Any], evaluated: dict[str, Any], tolerance: float = 1e-4) -> None:
    """Raise when this module's perplexities differ from `Fixture.evaluate`'s on the same model."""
    theirs = {d["domain"]: d["perplexity"] for d in evaluated["domains"]}
    for entry in ours["domains"]:
        expected = theirs[entry["domain"]]
        if abs(entry["perplexity"] - expected) > tolerance * expected:
            raise RuntimeError(f"perplexity on {entry['domain']}: {entry['perplexity']:.6f} here but "
                               f"{expected:.6f} from Fixture.evaluate; the windows or the formula differ")


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return float("inf")
