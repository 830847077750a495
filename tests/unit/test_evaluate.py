"""Perplexity evaluation: window NLL against the model's own loss, per-domain reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moecompress.calibration.data import DomainSource, read_texts, token_stream, windows
from moecompress.errors import MoecompressError
from moecompress.evaluate import EvalReport, evaluate_perplexity, window_nll
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch
from tests.tiny_tokenizer import sample_text, train_tokenizer


VOCAB = 300  # byte-level BPE: 256 byte tokens + <eos> + merges


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model(tokenizer) -> torch.nn.Module:
    config = TINY_CONFIGS["qwen3_moe"]()
    config.vocab_size = len(tokenizer)
    return tiny_model(config, seed=0)


def _hand_nll(model: torch.nn.Module, rows: torch.Tensor) -> float:
    """Sum over windows of the model's mean loss times its S-1 predicted tokens."""
    total = 0.0
    with torch.no_grad():
        for row in rows:
            loss = model(input_ids=row[None], labels=row[None]).loss
            total += float(loss) * (row.numel() - 1)
    return total


def test_window_nll_matches_model_loss(model) -> None:
    rows = token_batch(model.config.vocab_size, batch=5, length=20, seed=3)  # (5, 20)
    nll, tokens = window_nll(model, rows, batch_size=2, progress=False)
    assert tokens == 5 * 19
    assert nll == pytest.approx(_hand_nll(model, rows), rel=1e-5)


def test_window_nll_independent_of_batch_size(model) -> None:
    rows = token_batch(model.config.vocab_size, batch=7, length=16, seed=4)  # (7, 16)
    one, _ = window_nll(model, rows, batch_size=1, progress=False)
    many, _ = window_nll(model, rows, batch_size=4, progress=False)
    assert many == pytest.approx(one, rel=1e-5)


def test_window_nll_rejects_bad_input(model) -> None:
    with pytest.raises(MoecompressError):
        window_nll(model, torch.zeros(3, 1, dtype=torch.long), progress=False)
    with pytest.raises(MoecompressError):
        window_nll(model, torch.zeros(3, 4, dtype=torch.long), batch_size=0, progress=False)


def test_window_nll_on_streaming_model(model, tmp_path) -> None:
    from moecompress.engine.reader import CheckpointReader
    from moecompress.evaluate import streamed_window_nll

    model.save_pretrained(tmp_path / "ckpt")
    rows = token_batch(model.config.vocab_size, batch=5, length=12, seed=5)
    expected, expected_tokens = window_nll(model, rows, batch_size=2, progress=False)
    reader = CheckpointReader(tmp_path / "ckpt", dtype="float32")
    got, tokens = streamed_window_nll(reader, rows, batch_size=2, progress=False)
    assert tokens == expected_tokens
    assert got == pytest.approx(expected, rel=1e-5)
    assert all(p.device.type == "meta" for p in reader.model.parameters())  # nothing left loaded
    # auto keeps experts, embeddings and head in the stored dtype: the head is fed its own dtype
    auto, _ = streamed_window_nll(CheckpointReader(tmp_path / "ckpt", dtype="auto"), rows, progress=False)
    assert auto == pytest.approx(expected, rel=1e-2)


def _write_domains(tmp_path) -> list[DomainSource]:
    text = sample_text()
    half = len(text) // 2
    (tmp_path / "a.txt").write_text(text[:half])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in text[half:].split("\n\n") if p.strip()))
    return [DomainSource("first", tmp_path / "a.txt"), DomainSource("second", tmp_path / "b.jsonl")]


def test_evaluate_perplexity_report(model, tokenizer, tmp_path) -> None:
    sources = _write_domains(tmp_path)
    report = evaluate_perplexity(model, tokenizer, sources, seq_len=32, max_windows=3, batch_size=2, progress=False)
    assert [r.domain for r in report.results] == ["first", "second"]
    for source, result in zip(sources, report.results):
        rows = windows(token_stream(tokenizer, read_texts(source)), 32, count=3)  # first 3 windows
        nll, tokens = window_nll(model, rows, batch_size=2, progress=False)  # same batches as the report
        assert result.windows == 3 and result.tokens == 3 * 31 == tokens
        assert result.nll == pytest.approx(nll, rel=1e-7)
        assert result.perplexity == pytest.approx(math.exp(nll / tokens))
    assert report.mean_perplexity == pytest.approx(sum(r.perplexity for r in report.results) / 2)
    again = evaluate_perplexity(model, tokenizer, sources, seq_len=32, max_windows=3, batch_size=2, progress=False)
    assert [r.nll for r in again.results] == [r.nll for r in report.results]
    as_dict = report.to_dict()
    assert json.loads(json.dumps(as_dict))["domains"][1]["domain"] == "second"
    assert as_dict["mean_perplexity"] == report.mean_perplexity


def test_short_domain_uses_the_windows_it_has(model, tokenizer, tmp_path) -> None:
    (tmp_path / "short.txt").write_text(sample_text()[:600])
    source = DomainSource("short", tmp_path / "short.txt")
    available = token_stream(tokenizer, read_texts(source)).numel() // 16
    assert 0 < available < 1000
    report = evaluate_perplexity(model, tokenizer, [source], seq_len=16, max_windows=1000, progress=False)
    assert report.results[0].windows == available
    assert report.results[0].tokens == available * 15


def test_tokenizer_larger_than_model_vocab_is_an_error(tokenizer, tmp_path) -> None:
    small = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)  # vocab 128 < tokenizer's 300
    with pytest.raises(MoecompressError, match="vocabulary"):
        evaluate_perplexity(small, tokenizer, _write_domains(tmp_path), seq_len=16, max_windows=1, progress=False)


def test_too_little_text_or_too_long_windows_is_an_error(model, tokenizer, tmp_path) -> None:
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(MoecompressError, match="fewer than one window"):
        evaluate_perplexity(model, tokenizer, [DomainSource("tiny", tmp_path / "tiny.txt")], seq_len=64, progress=False)
    sources = _write_domains(tmp_path)
    with pytest.raises(MoecompressError, match="max_position_embeddings"):
        evaluate_perplexity(model, tokenizer, sources, seq_len=10_000, progress=False)


def test_mean_of_empty_report_is_nan() -> None:
    assert math.isnan(EvalReport(results=[], seq_len=8, max_windows=1).mean_perplexity)
