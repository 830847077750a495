"""A small byte-level BPE tokenizer trained in the test itself (no hub access)."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

from transformers import PreTrainedTokenizerFast


def sample_text() -> str:
    """Real English and Python text available offline: the standard library's textwrap module."""
    return inspect.getsource(textwrap)


def train_tokenizer(vocab_size: int = 300, text: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (EOS `<eos>`) trained on `text` (default: `sample_text()`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((text or sample_text()).split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def save_tokenizer(folder: Path, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Train a tokenizer and save it into `folder` so `AutoTokenizer.from_pretrained(folder)` works."""
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.save_pretrained(folder)
    return tokenizer
