"""`prune --merge centroid|cluster`: removed experts folded into the kept ones, written as a stock checkpoint.

Every output is reopened with `AutoModelForCausalLM.from_pretrained` and checked against what
the plan says, computed from the input model: each output expert's canonical weights are the
frequency-weighted sum of its members' (`PrunePlan.merged`/`merge_weights`), each member's
neurons aligned to the representative's,
its router row (and correction bias) is its representative's, and the logits equal those of
the input model merged and dropped in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.calibration.calibrate import calibrate
from moecompress.calibration.request import CalibrationRequest
from moecompress.calibration.data import parse_data_specs
from moecompress.models.load import load_model
from moecompress.models.tensors import get_tensor
from moecompress.prune.materialize import merge_in_place, write_pruned
from moecompress.models.neuron_alignment import align_neurons, neuron_features
from moecompress.prune.run import prune_checkpoint
from moecompress.prune.request import PruneRequest
from tests.cli_helpers import error_lines, make_checkpoint, run_cli, two_domain_specs
from tests.helpers import token_batch

CALIBRATION = dict(samples=4, seq_len=32, batch_size=2)  # PruneRequest fields


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    return two_domain_specs(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(root / name, name) for name in ("qwen3_moe", "deepseek_v3", "gpt_oss", "dbrx")}


FIELDS = (("gate", 0), ("up", 0), ("down", 1), ("gate_bias", 0), ("up_bias", 0), ("down_bias", None))


def _canonical(adapter, ref, expert: int, perm: torch.Tensor | None = None) -> list[torch.Tensor]:
    """An expert's canonical tensors (float64), its neurons reordered by `perm` when given."""
    weights = adapter.expert_weights(ref, expert)
    out = []
    for name, axis in FIELDS:
        tensor = getattr(weights, name)
        if tensor is None:
            continue
        tensor = tensor.detach().double()
        out.append(tensor if perm is None or axis is None else tensor.index_select(axis, perm))
    return out


def _permutation(adapter, ref, representative: int, member: int) -> torch.Tensor:
    """The member's neuron order that best matches the representative (checked by brute force in the unit tests)."""
    def features(e: int) -> torch.Tensor:
        w = adapter.expert_weights(ref, e)
        mats = [(t, axis) for t, axis in ((w.gate, 0), (w.up, 0), (w.down, 1)) if t is not None]
        return neuron_features([t for t, _ in mats], [axis for _, axis in mats])

    return align_neurons(features(representative), features(member))


def _reference(source: Path, plan) -> torch.nn.Module:
    model, adapter = load_model(source, dtype="float32")
    merge_in_place(model, adapter, plan)
    return adapter.drop(model, keep_experts=plan.keep)


def test_mean_output_sums_every_expert_over_every_token(checkpoints, data) -> None:
    """The statistic against hooks on the whole model: each expert's canonical forward on all of the layer's inputs."""
    source = checkpoints["qwen3_moe"]
    stats = calibrate(source,
                      CalibrationRequest(sources=parse_data_specs(data), samples=4, seq_len=32, batch_size=2,
                                         statistics=["count", "mean_output"]), progress=False)
    model, adapter = load_model(source, dtype="float32")
    refs = adapter.moe_layers(model)
    inputs: dict[int, list[torch.Tensor]] = {ref.index: [] for ref in refs}
    handles = [ref.experts.register_forward_pre_hook(
        lambda module, args, _i=ref.index: inputs[_i].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for ref in refs]
    from moecompress.calibration.data import build_calibration_set
    from moecompress.models.load import load_tokenizer

    calib = build_calibration_set(load_tokenizer(source), parse_data_specs(data), num_samples=4, seq_len=32, seed=0)
    with torch.no_grad():
        for start in range(0, calib.input_ids.shape[0], 2):
            model(calib.input_ids[start:start + 2])
    for handle in handles:
        handle.remove()
    for ref in refs:
        hidden = torch.cat(inputs[ref.index])  # (T, H)
        expected = torch.stack([adapter.expert_weights(ref, e).forward(hidden).double().sum(dim=0)
                                for e in range(ref.num_experts)])  # (E, H)
        got = stats.get("mean_output", ref.index)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert stats.tokens(ref.index) == hidden.shape[0]


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss", "dbrx"])
@pytest.mark.parametrize("merge", ["centroid", "cluster"])
def test_merged_checkpoint_holds_what_the_plan_says(arch, merge, checkpoints, data, tmp_path) -> None:
    source = checkpoints[arch]
    out = tmp_path / "merged"
    result = prune_checkpoint(source, out, PruneRequest(method="frequency", ratio=0.5,
                                                        sources=parse_data_specs(data), protect_super_experts=False,
                                                        merge=merge, **CALIBRATION), progress=False)
    plan = result.plan
    assert plan.merge == merge and set(plan.merged) == set(plan.keep)
    assert any(len(members) > 1 for per in plan.merged.values() for members in per)  # something was merged
    saved = json.loads((out / "prune_plan.json").read_text())
    assert saved["merge"] == merge and saved["merged"] and saved["merge_weights"]
    assert "merged into" in (out / "README.md").read_text()

    original, adapter = load_model(source, dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert adapter.num_experts(merged.config) == len(next(iter(plan.keep.values())))
    for before, after in zip(adapter.moe_layers(original), adapter.moe_layers(merged)):
        layer = before.index
        for slot, (rep, members, weights) in enumerate(zip(plan.keep[layer], plan.merged[layer],
                                                           plan.merge_weights[layer])):
            assert rep in members and sum(weights) == pytest.approx(1.0)
            aligned = [_canonical(adapter, before, e, None if e == rep else _permutation(adapter, before, rep, e))
                       for e in members]
            expected = [sum(w * t for w, t in zip(weights, parts)) for parts in zip(*aligned)]
            for got, want in zip(_canonical(adapter, after, slot), expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        router_before = adapter.router_weight(before.router).detach()
        torch.testing.assert_close(adapter.router_weight(after.router).detach(),
                                   router_before[torch.as_tensor(plan.keep[layer])])
        for path in adapter.correction_bias_paths:
            bias = get_tensor(original, f"{before.path}.{path}")
            if bias is not None:
                torch.testing.assert_close(get_tensor(merged, f"{after.path}.{path}"),
                                           bias[..., torch.as_tensor(plan.keep[layer])])
    reference = _reference(source, plan)
    ids = token_batch(merged.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_copy_and_model_paths_write_the_same_merge(checkpoints, data, tmp_path) -> None:
    """The streaming tensor copy (per-expert keys) against materialising the merge on the whole model."""
    source = checkpoints["qwen3_moe"]
    copied = prune_checkpoint(source, tmp_path / "copied",
        PruneRequest(method="reap", ratio=0.5, sources=parse_data_specs(data), protect_super_experts=False,
                     merge="centroid", **CALIBRATION), progress=False)
    from moecompress.models.load import inspect_checkpoint, load_tokenizer

    model, adapter = load_model(source, dtype="auto")
    info = inspect_checkpoint(source)
    write_pruned(model, adapter, copied.plan, load_tokenizer(source), tmp_path / "through-model", {}, source)
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "copied", dtype=torch.float32).state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "through-model", dtype=torch.float32).state_dict()
    assert sorted(one) == sorted(two) and info.config.model_type == "qwen3_moe"
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=0, atol=0, msg=name)


def test_merging_nothing_away_is_plain_pruning(checkpoints, data, tmp_path) -> None:
    """--merge centroid at ratio 0 keeps every expert unchanged: the output equals the input."""
    source = checkpoints["qwen3_moe"]
    result = prune_checkpoint(source, tmp_path / "same", PruneRequest(method="frequency", ratio=0.0,
                                                                      sources=parse_data_specs(data),
                                                                      protect_super_experts=False, merge="centroid",
                                                                      **CALIBRATION), progress=False)
    assert all(members == [rep] for layer, per in result.plan.merged.items()
               for rep, members in zip(result.plan.keep[layer], per))
    one = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "same", dtype=torch.float32).state_dict()
    for name, tensor in one.items():
        assert torch.equal(two[name], tensor), name


def test_cli_merges_and_shows_the_groups(checkpoints, data, tmp_path, monkeypatch, capsys) -> None:
    args = ["prune", str(checkpoints["qwen3_moe"]), "--ratio", "0.5", "--merge", "cluster", "--samples", "4",
            "--seq-len", "32", "--batch-size", "2", "--no-protect-super-experts"]
    for item in data:
        args += ["--data", item]
    code, out, err = run_cli([*args, "-o", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 0, err
    assert "cluster merging" in out and "merged groups" in out and "{" in out
    manifest = json.loads((tmp_path / "out" / "moecompress_manifest.json").read_text())
    assert manifest["plan"]["merge"] == "cluster" and manifest["plan"]["merged"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "heapr", "--merge", "centroid"], "neuron methods"),
    (["--merge", "centroid", "--scoring", "sequential"], "--scoring one-pass"),
    (["--merge", "mean"], "--merge must be one of"),
])
def test_cli_refuses_merges_it_cannot_serve(extra, message, checkpoints, tmp_path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(["prune", str(checkpoints["qwen3_moe"]), "--ratio", "0.5", *extra,
                            "-o", str(tmp_path / "out")], monkeypatch, capsys)
    lines = error_lines(err)
    assert code != 0 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_stats_without_mean_output_are_refused_in_one_line(checkpoints, data, tmp_path, monkeypatch, capsys) -> None:
    source = checkpoints["qwen3_moe"]
    stats_dir = tmp_path / "stats"
    calibrate(source,
              CalibrationRequest(sources=parse_data_specs(data), samples=4, seq_len=32, batch_size=2,
                                 statistics=["count"]), progress=False).save(stats_dir)
    code, _, err = run_cli(["prune", str(source), "--ratio", "0.5", "--method", "frequency", "--merge", "centroid",
                            "--stats", str(stats_dir), "--no-protect-super-experts", "-o", str(tmp_path / "out")],
                           monkeypatch, capsys)
    lines = error_lines(err)
    assert code != 0 and len(lines) == 1 and "--statistic mean_output" in lines[0], err
