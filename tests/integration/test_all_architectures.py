"""`inspect`, `calibrate` (one layer at a time, streamed from disk) and `eval` on every supported architecture.

For each tiny seeded model: the checkpoint is described without loading weights, the
calibration pass runs from the checkpoint files (counts sum to tokens x top_k in every MoE
layer), and perplexity evaluation gives finite numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from moecompress.calibration.calibrate import calibrate
from moecompress.calibration.request import CalibrationRequest
from moecompress.calibration.data import DomainSource
from moecompress.cli.inspect_cmd import describe_checkpoint
from moecompress.evaluate import evaluate_perplexity
from moecompress.models.adapters import get_adapter
from moecompress.models.load import load_model, load_tokenizer
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.cli_helpers import make_checkpoint
from tests.tiny_tokenizer import sample_text


@pytest.fixture(scope="module")
def text_source(tmp_path_factory) -> DomainSource:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(sample_text())
    return DomainSource(name="text", path=path)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_inspect_calibrate_eval(model_type, tmp_path, text_source) -> None:
    folder = make_checkpoint(tmp_path / model_type, model_type)
    description = describe_checkpoint(folder)
    assert description["model_type"] == model_type or model_type.startswith(description["model_type"])

    stats = calibrate(folder,
                      CalibrationRequest(sources=[text_source], samples=2, seq_len=16, seed=0, batch_size=2,
                                         statistics=["count", "soft_count", "gated_out_norm", "max_act"]),
                      progress=False)
    model, adapter = load_model(folder)
    layers = {ref.index: ref for ref in adapter.moe_layers(model)}
    assert stats.header.moe_layers == sorted(layers)
    for index, ref in layers.items():
        tokens = stats.tokens(index)
        assert tokens == 2 * 16
        assert stats.get("count", index).sum() == tokens * ref.top_k
        assert torch.isfinite(stats.get("gated_out_norm", index)).all()

    report = evaluate_perplexity(model, load_tokenizer(folder), [text_source], seq_len=16, max_windows=2,
                                 progress=False)
    assert all(math.isfinite(r.perplexity) for r in report.results)
    assert get_adapter(model).num_experts(model.config) == stats.header.num_experts
