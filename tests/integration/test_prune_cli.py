"""`moecompress prune` and `moecompress route-task` end to end on a tiny Qwen3-MoE checkpoint.

Every written checkpoint is re-opened the way users would (plain transformers for uniform
plans, `moecompress.load` for layouts) and compared with the original model with the same
experts masked (or the same neurons zeroed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moecompress
from moecompress.models.adapters import get_adapter
from tests.cli_helpers import error_lines, make_checkpoint, run_cli
from tests.helpers import token_batch
from tests.tiny_tokenizer import sample_text

ATOL = 2e-5
CALIB = ["--samples", "2", "--seq-len", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen3_moe") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("data")
    text = sample_text()
    half = len(text) // 2
    (folder / "a.txt").write_text(text[:half])
    (folder / "b.txt").write_text(text[half:])
    return ["--data", f"a={folder / 'a.txt'}", "--data", f"b={folder / 'b.txt'}"]


@pytest.fixture(scope="module")
def original(checkpoint: Path):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def masked_logits(model, keep: dict, ids: torch.Tensor) -> torch.Tensor:
    adapter = get_adapter(model)
    with torch.no_grad(), adapter.mask_experts(model, {int(k): v for k, v in keep.items()}):
        return model(ids).logits


def plan_of(folder: Path) -> dict:
    return json.loads((folder / "moecompress_manifest.json").read_text())["plan"]


def test_reap_uniform_reloads_in_transformers(checkpoint, data, original, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "reap"
    code, stdout, err = run_cli(["prune", str(checkpoint), "--method", "reap", "--ratio", "0.5", *data, *CALIB,
                                 "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    for expected in ("Pruned: reap, uniform allocation", "4/8", "super experts protected", "parameters:",
                     "bytes on disk:", "AutoModelForCausalLM.from_pretrained"):
        assert expected in stdout
    manifest = json.loads((out / "moecompress_manifest.json").read_text())
    assert manifest["method"] == "reap" and manifest["format"] == "transformers"
    assert manifest["calibration"]["stats_digest"] and manifest["seed"] == 0 and manifest["versions"]["torch"]
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    keep = manifest["plan"]["keep"]
    assert {len(v) for v in keep.values()} == {4}
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = token_batch(original.config.vocab_size, seed=4)
    with torch.no_grad():
        got = reloaded(ids).logits
    torch.testing.assert_close(got, masked_logits(original, keep, ids), atol=ATOL, rtol=1e-4)
    loaded = moecompress.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, got, atol=0, rtol=0)


def test_dry_run_writes_nothing(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "dry"
    code, stdout, err = run_cli(["prune", str(checkpoint), "--method", "frequency", "--keep", "3", *data, *CALIB,
                                 "-o", str(out), "--dry-run"], monkeypatch, capsys)
    assert code == 0, err
    assert "Planned: frequency" in stdout and "(estimate)" in stdout and "3/8" in stdout
    assert not out.exists()


def test_infeasible_request_fails_before_model_work(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    import moecompress.models.load as load_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(load_module, "load_model", no_model)
    out = tmp_path / "bad"
    code, _, err = run_cli(["prune", str(checkpoint), "--method", "reap", "--ratio", "0.9", *data, "-o", str(out)],
                           monkeypatch, capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "top_k=2" in line and "feasible counts: 2, 3, 4, 5, 6, 7, 8" in line
    assert not out.exists()
    code, _, err = run_cli(["prune", str(checkpoint), "--method", "heapr", "--keep", "4", "-o", str(out)],
                           monkeypatch, capsys)
    assert code == 2 and "--ratio" in error_lines(err)[0]
    code, _, err = run_cli(["prune", str(checkpoint), "--method", "reap", "--ratio", "0.5", "--dynamic-skip",
                            "--top-k", "1", "-o", str(out)], monkeypatch, capsys)
    assert code == 2 and "top-2" in error_lines(err)[0]
    code, _, err = run_cli(["prune", str(checkpoint), "--method", "reap", "--ratio", "0.5", "--patterns",
                            str(tmp_path / "p.json"), "-o", str(out)], monkeypatch, capsys)
    assert code == 2 and "premoe" in error_lines(err)[0]
    code, _, err = run_cli(["prune", str(checkpoint), "--method", "easy_ep", "--ratio", "0.5", "--domain", "nope",
                            *data, "-o", str(out)], monkeypatch, capsys)
    assert code == 2 and "have: a, b" in error_lines(err)[0]
    code, _, err = run_cli(["prune", str(checkpoint), "--method", "frequency", "--ratio", "0.5", "--allocation",
                            "sideways", *data, "-o", str(out)], monkeypatch, capsys)
    assert code == 2 and "--allocation" in error_lines(err)[0]
    assert not out.exists()


def test_force_semantics(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "forced"
    out.mkdir()
    (out / "keep-me.txt").write_text("x")
    args = ["prune", str(checkpoint), "--method", "frequency", "--ratio", "0.5", *data, *CALIB, "-o", str(out)]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "--force" in error_lines(err)[0]
    assert (out / "keep-me.txt").is_file()
    code, _, err = run_cli([*args, "--force"], monkeypatch, capsys)
    assert code == 0, err
    assert not (out / "keep-me.txt").exists() and (out / "config.json").is_file()
    code, _, err = run_cli(["prune", str(checkpoint), "--method", "frequency", "--ratio", "0.5", "-o",
                            str(checkpoint), "--force"], monkeypatch, capsys)
    assert code == 2 and "input checkpoint" in error_lines(err)[0]


def test_global_allocation_writes_a_layout(checkpoint, data, original, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "global"
    code, stdout, err = run_cli(["prune", str(checkpoint), "--method", "frequency", "--ratio", "0.5", "--allocation",
                                 "global", *data, *CALIB, "--no-protect-super-experts", "-o", str(out)],
                                monkeypatch, capsys)
    assert code == 0, err
    assert "moecompress.load" in stdout and "note:" in stdout
    manifest = json.loads((out / "moecompress_manifest.json").read_text())
    assert manifest["format"] == "moecompress-layout"
    keep = manifest["plan"]["keep"]
    assert sum(len(v) for v in keep.values()) == 8
    assert (out / "moecompress_layout.json").is_file() and "moecompress.load" in (out / "README.md").read_text()
    model = moecompress.load(out)
    ids = token_batch(original.config.vocab_size, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked_logits(original, keep, ids), atol=ATOL, rtol=1e-4)


def zeroed_logits(checkpoint: Path, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the original model with every neuron the pruned folder dropped zeroed (down_proj column)."""
    from safetensors.torch import load_file

    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    adapter = get_adapter(reference)
    masks = load_file(str(folder / "prune_neurons.safetensors"))
    with torch.no_grad():
        for ref in adapter.moe_layers(reference):
            mask = masks[f"layer.{ref.index}"]
            for e in range(ref.num_experts):
                adapter.expert_weights(ref, e).down[:, ~mask[e]] = 0
        return reference(ids).logits


def test_heapr_global_and_uniform(checkpoint, data, original, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "heapr"
    code, stdout, err = run_cli(["prune", str(checkpoint), "--method", "heapr", "--ratio", "0.25", *data, *CALIB,
                                 "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert "Pruned: heapr, global allocation" in stdout and "neurons kept" in stdout
    plan = plan_of(out)
    widths = plan["widths"]
    total = sum(len(v) for v in widths.values()) * plan["intermediate_size"]
    assert sum(sum(v) for v in widths.values()) == total - round(0.25 * total)
    assert len({w for v in widths.values() for w in v}) > 1  # widths differ per expert
    model = moecompress.load(out)
    ids = token_batch(original.config.vocab_size, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, zeroed_logits(checkpoint, out, ids), atol=ATOL, rtol=1e-4)

    uniform = tmp_path / "heapr-uniform"
    code, stdout, err = run_cli(["prune", str(checkpoint), "--method", "heapr", "--ratio", "0.25", "--allocation",
                                 "uniform", *data, *CALIB, "-o", str(uniform)], monkeypatch, capsys)
    assert code == 0, err
    reloaded = AutoModelForCausalLM.from_pretrained(uniform, dtype=torch.float32).eval()
    assert reloaded.config.moe_intermediate_size == 24
    assert "AutoModelForCausalLM.from_pretrained" in stdout
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, zeroed_logits(checkpoint, uniform, ids), atol=ATOL, rtol=1e-4)


def test_naee_with_dynamic_skip(checkpoint, data, original, tmp_path, monkeypatch, capsys) -> None:
    from moecompress.prune.dynamic_skip import skip_counts

    out = tmp_path / "naee"
    code, stdout, err = run_cli(["prune", str(checkpoint), "--method", "naee", "--keep", "4", "--param",
                                 "search=greedy", "--dynamic-skip", *data, *CALIB, "-o", str(out)],
                                monkeypatch, capsys)
    assert code == 0, err
    assert "dynamic skipping:" in stdout and "of expert calls skipped" in stdout
    config = json.loads((out / "config.json").read_text())
    skip = config["moecompress"]["dynamic_skip"]
    assert set(skip["beta"]) == {"1", "2"} and 0.1 < skip["calibration_skip_fraction"] < 0.4
    keep = plan_of(out)["keep"]
    ids = token_batch(original.config.vocab_size, seed=4)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, masked_logits(original, keep, ids), atol=ATOL, rtol=1e-4)
    skipping = moecompress.load(out)
    with torch.no_grad():
        skipped_logits = skipping(ids).logits
    counts = skip_counts(skipping)
    assert counts["calls"] == 2 * ids.numel() * 2 and 0 < counts["skipped"] < counts["calls"]
    assert torch.isfinite(skipped_logits).all()


def test_premoe_patterns_and_route_task(checkpoint, data, original, tmp_path, monkeypatch, capsys) -> None:
    patterns = tmp_path / "patterns.json"
    out = tmp_path / "premoe"
    code, stdout, err = run_cli(["prune", str(checkpoint), "--method", "premoe", "--ratio", "0.5", "--domain", "a",
                                 "--patterns", str(patterns), *data, *CALIB, "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert "patterns for route-task written" in stdout
    stored = json.loads(patterns.read_text())
    assert set(stored["patterns"]) == {"a", "b"} and stored["first_layer"] == 1
    assert len(stored["patterns"]["a"]["tcess_first"]) == 8
    assert plan_of(out)["keep"] == stored["patterns"]["a"]["keep"]
    assert plan_of(out)["domain"] == "a"

    prompts = Path(data[1].split("=", 1)[1])  # domain a's own text
    routed = tmp_path / "routed"
    code, stdout, err = run_cli(["route-task", str(prompts), "--patterns", str(patterns), "-o", str(routed)],
                                monkeypatch, capsys)
    assert code == 0, err
    manifest = json.loads((routed / "moecompress_manifest.json").read_text())
    distances = manifest["retrieval"]["distances"]
    chosen = manifest["retrieval"]["chosen"]
    assert chosen == min(distances, key=distances.get) and f"chosen: {chosen}" in stdout
    assert manifest["plan"]["keep"] == stored["patterns"][chosen]["keep"]
    reloaded = AutoModelForCausalLM.from_pretrained(routed, dtype=torch.float32).eval()
    ids = token_batch(original.config.vocab_size, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, masked_logits(original, manifest["plan"]["keep"], ids),
                                   atol=ATOL, rtol=1e-4)


def test_premoe_threshold_and_top_k_patch(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "premoe-opts"
    code, stdout, err = run_cli(["prune", str(checkpoint), "--method", "premoe", "--keep", "4", "--param", "top_k=2",
                                 "--param", "threshold=0.05", "--top-k", "1", *data, *CALIB, "-o", str(out)],
                                monkeypatch, capsys)
    assert code == 0, err
    assert "top-k: 2 -> 1" in stdout
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 1
    assert plan_of(out)["params"] == {"top_k": 2, "threshold": 0.05}


def test_param_values_are_read_as_json_or_text_and_malformed_ones_refused() -> None:
    from moecompress.cli.prune_cmd import parse_params
    from moecompress.errors import MoecompressError

    assert parse_params(["k=3", "s=abc", "l=[1, 2]", "e="]) == {"k": 3, "s": "abc", "l": [1, 2], "e": ""}
    with pytest.raises(MoecompressError, match=r"--param '=3' must look like key=value"):
        parse_params(["=3"])
