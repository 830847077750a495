"""Shared benchmark plumbing: the fixtures, the evaluation protocol, calibration, reload-and-evaluate.

Protocol (BENCHMARKS.md): perplexity per domain on the corpus' test split, the first
`windows` non-overlapping windows of `seq_len` tokens per domain, plus the mean over domains;
calibration statistics from the validation split (`calib_windows` seeded windows per domain).
Every compressed model is written with `save_pretrained` and reloaded with plain
`AutoModelForCausalLM.from_pretrained` before it is evaluated, so the numbers are those of
the checkpoint a user would load.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.fixtures import paths
from benchmarks.fixtures.measure import split_sources


@dataclass
class Protocol:
    """How every number of a run is measured."""

    seq_len: int = 256
    windows: int = 64  # test windows per domain
    calib_windows: int = 32  # validation windows per domain for calibration statistics
    calib_seed: int = 0
    batch_size: int = 8

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return dict(self.__dict__)


@dataclass
class Fixture:
    """One trained fixture model on disk, with lazily loaded model, tokenizer and statistics."""

    name: str
    folder: Path
    corpus: Path
    protocol: Protocol
    _stats: dict[tuple[str, ...], Any] = field(default_factory=dict, repr=False)

    @cached_property
    def record(self) -> dict[str, Any]:
        """The fixture's training.json."""
        return json.loads((self.folder / "training.json").read_text())

    @property
    def domains(self) -> list[str]:
        """The corpus domains the fixture was trained on."""
        return list(self.record["spec"]["domains"])

    @cached_property
    def tokenizer(self) -> Any:
        """The fixture's own tokenizer."""
        from moecompress.models.load import load_tokenizer

        return load_tokenizer(self.folder)

    @cached_property
    def model(self) -> nn.Module:
        """The unpruned model in float32, eval mode."""
        from moecompress.models.load import load_model

        model, _ = load_model(self.folder, dtype="float32")
        return model

    @cached_property
    def adapter(self) -> Any:
        """The fixture's moecompress adapter."""
        from moecompress.models.adapters import get_adapter

        return get_adapter(self.model)

    def test_sources(self) -> list[Any]:
        """Evaluation sources: each domain's test split."""
        return split_sources(self.corpus, self.domains, "test")

    def calibration_sources(self) -> list[Any]:
        """Calibration sources: each domain's validation split."""
        return split_sources(self.corpus, self.domains, "valid")

    def stats(self, statistics: tuple[str, ...] = ("count",)) -> Any:
        """Calibration statistics on the validation split (computed once per statistic set)."""
        from moecompress.calibration.calibrate import calibrate
        from moecompress.calibration.request import CalibrationRequest

        key = tuple(sorted(statistics))
        if key not in self._stats:
            self._stats[key] = calibrate(self.folder,
                                         CalibrationRequest(sources=self.calibration_sources(),
                                                            samples=self.protocol.calib_windows,
                                                            seq_len=self.protocol.seq_len,
                                                            seed=self.protocol.calib_seed,
                                                            batch_size=self.protocol.batch_size, statistics=list(key)),
                                         progress=False)
        return self._stats[key]

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Per-domain test perplexity of an in-memory model (already reloaded by the caller)."""
        from moecompress.evaluate import evaluate_perplexity

        report = evaluate_perplexity(
            model, self.tokenizer, self.test_sources(), seq_len=self.protocol.seq_len,
            max_windows=self.protocol.windows, batch_size=self.protocol.batch_size, progress=False,
        )
        return report.to_dict()

    @cached_property
    def unpruned(self) -> dict[str, Any]:
        """The unpruned model's test perplexity under the run's protocol (computed once)."""
        result = self.evaluate(self.model)
        result.pop("model_path", None)
        result["parameters"] = sum(p.numel() for p in self.model.parameters())
        return result

    def reload_and_evaluate(self, model: nn.Module) -> dict[str, Any]:
        """save_pretrained `model`, reload it with AutoModelForCausalLM.from_pretrained, evaluate it."""
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory(prefix="moecompress-bench-") as tmp:
            model.save_pretrained(tmp)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, local_files_only=True).eval()
            result = self.evaluate(reloaded)
            result["parameters"] = sum(p.numel() for p in reloaded.parameters())
            result["bytes_on_disk"] = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        result.pop("model_path", None)
        return result


def load_fixtures(names: list[str], protocol: Protocol, root: Path | None = None) -> list[Fixture]:
    """The named fixtures from the cache; a clear error when one has not been built."""
    from benchmarks.fixtures.build import example_install_dir

    root = root or paths.fixtures_root()
    fixtures = []
    for name in names:
        folder = paths.model_dir(name, root)
        if name == "example" and not (folder / "training.json").is_file():
            folder = example_install_dir()  # the copy shipped in the package
        if not (folder / "training.json").is_file():
            raise SystemExit(
                f"fixture {name!r} is not built under {root}; run: python -m benchmarks.fixtures.build --only {name}"
            )
        fixtures.append(Fixture(name=name, folder=folder, corpus=paths.corpus_dir(root), protocol=protocol))
    return fixtures
