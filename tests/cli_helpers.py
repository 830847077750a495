"""Helpers for CLI tests: run the console entry in-process, build tiny checkpoints with tokenizers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model
from tests.tiny_tokenizer import save_tokenizer


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run `moecompress ARGS` in-process through `main`; return (exit code, stdout, stderr)."""
    from moecompress.cli.app import main

    monkeypatch.setattr(sys, "argv", ["moecompress", *args])
    monkeypatch.setenv("COLUMNS", "120")
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """The `error: ...` lines of stderr (and no traceback)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def make_checkpoint(folder: Path, model_type: str = "qwen3_moe", seed: int = 0) -> Path:
    """Save a tiny seeded model of `model_type` with a trained tokenizer into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(folder, vocab_size=300)
    config = TINY_CONFIGS[model_type]()
    config.vocab_size = len(tokenizer)
    if getattr(config, "unpadded_vocab_size", None):
        config.unpadded_vocab_size = len(tokenizer)
    tiny_model(config, seed=seed).save_pretrained(folder)
    return folder


def write_two_domains(folder: Path) -> tuple[Path, Path]:
    """Two calibration text files (the shipped sample text, halved) in `folder`: (first.txt, second.txt)."""
    from tests.tiny_tokenizer import sample_text

    text = sample_text()
    half = len(text) // 2
    (folder / "first.txt").write_text(text[:half])
    (folder / "second.txt").write_text(text[half:])
    return folder / "first.txt", folder / "second.txt"


def two_domain_specs(folder: Path) -> list[str]:
    """`--data` values for the two calibration domains written into `folder`: ["a=...", "b=..."]."""
    first, second = write_two_domains(folder)
    return [f"a={first}", f"b={second}"]
