"""`prune --scoring sequential`: each MoE layer scored on the outputs of the already-pruned layers before it.

The reference is computed independently of the layer engine: the whole model in memory,
layers 0..L-1 restricted to the experts chosen for them (`mask_experts`), an ordinary
whole-model observation pass, then layer L's scores and selection.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.calibration.calibrate import collect_statistics, build_stats
from moecompress.calibration.request import ObservedPass
from moecompress.calibration.data import build_calibration_set, parse_data_specs
from moecompress.io.manifest import read_manifest
from moecompress.models.adapters import get_adapter
from moecompress.models.load import load_model, load_tokenizer
from moecompress.prune.run import plan_pruning, prune_checkpoint, protected_experts, routing_shape
from moecompress.prune.request import PruneRequest
from moecompress.prune.scorers import get_scorer
from moecompress.prune.select import kept_count, select_uniform
from tests.cli_helpers import error_lines, make_checkpoint, run_cli, write_two_domains
from tests.helpers import token_batch

SAMPLES, SEQ_LEN, BATCH = 4, 32, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    first, second = write_two_domains(tmp_path_factory.mktemp("data"))
    return [f"a={first}", f"b={second}"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(root / name, name) for name in ("qwen3_moe", "deepseek_v3")}


SUPER = (0, 5)  # (index among the MoE layers, expert) made a super expert


@pytest.fixture(scope="module")
def with_super_expert(checkpoints, tmp_path_factory) -> Path:
    """The tiny Qwen3-MoE with one expert's down projection scaled 200x: a massive activation to protect."""
    folder = tmp_path_factory.mktemp("super") / "model"
    model = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3_moe"], dtype=torch.float32)
    adapter = get_adapter(model)
    ref = adapter.moe_layers(model)[SUPER[0]]
    with torch.no_grad():
        adapter.expert_weights(ref, SUPER[1]).down.mul_(200.0)  # a view of the fused tensor
    model.save_pretrained(folder)
    load_tokenizer(checkpoints["qwen3_moe"]).save_pretrained(folder)
    return folder


def _calibration(source: Path, data: list[str]):
    return build_calibration_set(load_tokenizer(source), parse_data_specs(data), num_samples=SAMPLES, seq_len=SEQ_LEN,
                                 seed=0)


def _reference_keep(source: Path, data: list[str], method: str, ratio: float) -> dict[int, list[int]]:
    """Sequential selection the slow way: one whole-model observation pass per MoE layer, earlier layers masked."""
    model, adapter = load_model(source, dtype="auto")
    calib = _calibration(source, data)
    scorer = get_scorer(method)
    shape = routing_shape(adapter, model.config)
    count = kept_count(shape, ratio=ratio)
    keep: dict[int, list[int]] = {}
    for ref in adapter.moe_layers(model):
        with adapter.mask_experts(model, dict(keep)):
            observer = collect_statistics(model, adapter, calib.input_ids, calib.domain_ids, calib.domains,
                                          ObservedPass(statistics=list(scorer.statistics()) + ["count"],
                                                       batch_size=BATCH, mode="whole-model"), False)
        stats = build_stats(model, observer, source, calib.digest, {}, "whole-model", 0)
        scores = scorer.score(stats, scorer.parse_params(None), None, None)
        keep[ref.index] = select_uniform({ref.index: scores[ref.index]}, shape, count)[ref.index]
    return keep


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("method", ["reap", "easy_ep"])
def test_sequential_choice_equals_the_whole_model_reference(model_type, method, checkpoints, data) -> None:
    source = checkpoints[model_type]
    ratio = 0.5
    request = PruneRequest(method=method, ratio=ratio, sources=parse_data_specs(data), samples=SAMPLES,
                           seq_len=SEQ_LEN, batch_size=BATCH, protect_super_experts=False)
    result = prune_checkpoint(source, None, request.model_copy(update={"scoring": "sequential"}), dry_run=True,
                              progress=False)
    assert result.plan.scoring == "sequential"
    assert result.plan.keep == _reference_keep(source, data, method, ratio)
    one_pass = prune_checkpoint(source, None, request, dry_run=True, progress=False)
    first = min(result.plan.keep)
    assert result.plan.keep[first] == one_pass.plan.keep[first]  # the first MoE layer sees the same inputs


def test_sequential_output_reloads_and_protects_the_one_pass_super_experts(with_super_expert, data, tmp_path,
                                                                          monkeypatch, capsys) -> None:
    source = with_super_expert
    out = tmp_path / "pruned"
    args = ["prune", str(source), "--method", "reap", "--ratio", "0.5", "--scoring", "sequential",
            *[arg for item in data for arg in ("--data", item)], "--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN),
            "--batch-size", str(BATCH), "-o", str(out)]
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "sequential scoring" in stdout
    manifest = read_manifest(out)
    assert manifest["plan"]["scoring"] == "sequential"
    keep = {int(k): v for k, v in manifest["plan"]["keep"].items()}
    # super experts are those of the unpruned model, found by one-pass statistics
    model, adapter = load_model(source, dtype="auto")
    calib = _calibration(source, data)
    observer = collect_statistics(model, adapter, calib.input_ids, calib.domain_ids, calib.domains,
                                  ObservedPass(statistics=["count", "max_act"], batch_size=BATCH, mode="layerwise"),
                                  False)
    one_pass = build_stats(model, observer, source, calib.digest, {}, "layerwise", 0)
    protected = protected_experts(one_pass, model.config, True)
    assert protected == {adapter.moe_layers(model)[SUPER[0]].index: [SUPER[1]]}
    assert {int(k): v for k, v in manifest["plan"]["protected"].items()} == protected
    assert all(set(ids) <= set(keep[layer]) for layer, ids in protected.items())
    # the written checkpoint opens in transformers and computes the original model routed to the kept experts
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = token_batch(original.config.vocab_size)
    with torch.no_grad(), get_adapter(original).mask_experts(original, keep):
        expected = original(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, expected, atol=2e-5, rtol=1e-4)
    # the plan a one-pass run builds from the pass's statistics is the one written (the checks in prune agree)
    plan = plan_pruning(one_pass, adapter, model.config, PruneRequest(method="frequency", ratio=0.5,
                                                                      protect_super_experts=True))
    assert plan.scoring == "one-pass" and plan.protected == protected


@pytest.mark.parametrize(("extra", "says"), [
    (["--method", "heapr", "--ratio", "0.5", "--scoring", "sequential"], "heapr prunes neurons"),
    (["--method", "naee", "--keep", "4", "--scoring", "sequential"], "whole model"),
    (["--method", "reap", "--ratio", "0.5", "--allocation", "global", "--scoring", "sequential"],
     "--allocation uniform"),
    (["--method", "reap", "--keep", "4", "--dynamic-skip", "--scoring", "sequential"], "--dynamic-skip"),
    (["--method", "reap", "--ratio", "0.5", "--scoring", "twice"], "--scoring must be one of"),
], ids=["neurons", "model-based", "global", "dynamic-skip", "unknown"])
def test_sequential_refusals_are_one_line(extra, says, checkpoints, tmp_path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(["prune", str(checkpoints["qwen3_moe"]), *extra, "-o", str(tmp_path / "out")],
                           monkeypatch, capsys)
    lines = error_lines(err)
    assert code != 0 and len(lines) == 1 and says in lines[0], err
    assert not (tmp_path / "out").exists()
