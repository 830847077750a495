"""The ``scale`` suite's parts on shrunken shapes: checkpoints, cgroup runner, search, fits, rendering."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.scale import fit
from benchmarks.scale.cgroup import (CapResult, own_memory_group, parse_flat_keyed, run_capped, smallest_cap,
                                     unavailable_reason)
from benchmarks.scale.checkpoints import build_checkpoint, cache_key, cached_checkpoint, on_disk_shapes
from benchmarks.scale.commands import COMMANDS
from benchmarks.scale.progress import bar_phases
from benchmarks.scale.specs import SPECS

SHRUNK = {
    "qwen3_30b_a3b": {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 8,
                      "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                      "vocab_size": 300, "bos_token_id": 0, "eos_token_id": 0},
    "mixtral_8x7b": {"hidden_size": 64, "intermediate_size": 96, "num_local_experts": 4, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 300},
    "deepseek_v3": {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "n_routed_experts": 8,
                    "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2, "q_lora_rank": 32, "kv_lora_rank": 16,
                    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "vocab_size": 300},
}
EXPERT_KEY = {
    "qwen3_30b_a3b": "model.layers.1.mlp.experts.7.gate_proj.weight",
    "mixtral_8x7b": "model.layers.1.block_sparse_moe.experts.3.w1.weight",
    "deepseek_v3": "model.layers.1.mlp.experts.7.gate_proj.weight",
}


def _header(folder: Path) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        entries.update(header)
    return entries


@pytest.mark.parametrize("name", sorted(SHRUNK))
def test_shrunken_checkpoint_loads_with_no_missing_or_unexpected_keys(tmp_path, name):
    from transformers import AutoModelForCausalLM

    record = build_checkpoint(tmp_path, name, layers=2, overrides=SHRUNK[name])
    header = _header(tmp_path)
    assert EXPERT_KEY[name] in header  # per-expert on-disk names, as save_pretrained writes them
    assert {entry["dtype"] for entry in header.values()} == {"BF16"}
    assert record["tensors"] == len(header) and (tmp_path / "scale.json").is_file()
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}
    assert model.config.num_hidden_layers == 2
    if name == "deepseek_v3":
        assert model.config.first_k_dense_replace == 1  # one dense layer, then MoE
        assert "model.layers.0.mlp.gate_proj.weight" in header  # the dense layer
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in header
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 300) and torch.isfinite(logits).all()


def test_shallower_checkpoint_holds_the_leading_layers_of_a_deeper_one(tmp_path):
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path in folder.glob("*.safetensors"):
            out.update(load_file(path))
        return out

    build_checkpoint(tmp_path / "two", "qwen3_30b_a3b", 2, overrides=SHRUNK["qwen3_30b_a3b"])
    build_checkpoint(tmp_path / "three", "qwen3_30b_a3b", 3, overrides=SHRUNK["qwen3_30b_a3b"])
    two, three = tensors(tmp_path / "two"), tensors(tmp_path / "three")
    assert set(two) < set(three)
    assert all(torch.equal(two[key], three[key]) for key in two)
    assert two["model.norm.weight"].eq(1).all()


@pytest.mark.parametrize("name, expert_shape, experts", [
    ("qwen3_30b_a3b", (768, 2048), 128), ("mixtral_8x7b", (14336, 4096), 8), ("deepseek_v3", (2048, 7168), 256)])
def test_real_shapes_on_the_meta_device(name, expert_shape, experts):
    spec = SPECS[name]
    shapes = on_disk_shapes(spec.config(2))
    gate = [key for key in shapes if re.search(r"layers\.1\..*experts\.\d+\.(gate_proj|w1)\.weight$", key)]
    assert len(gate) == experts and shapes[gate[0]] == expert_shape
    assert not any(".layers.2." in key for key in shapes)
    assert shapes["model.embed_tokens.weight"] == (spec.published["vocab_size"], spec.published["hidden_size"])


def test_full_depth_keeps_the_published_config():
    spec = SPECS["deepseek_v3"]
    assert spec.config_dict(61)["first_k_dense_replace"] == 3
    assert spec.config_dict(8)["first_k_dense_replace"] == 1 and spec.config_dict(1)["first_k_dense_replace"] == 0
    qwen = SPECS["qwen3_30b_a3b"].config(48)
    assert (qwen.num_experts, qwen.moe_intermediate_size, qwen.num_experts_per_tok, qwen.head_dim) == (128, 768, 8, 128)
    assert qwen.rope_parameters["rope_theta"] == 1e6 and qwen.norm_topk_prob and not qwen.tie_word_embeddings


def test_cached_checkpoint_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_SCALE_DIR", str(tmp_path))
    overrides = SHRUNK["mixtral_8x7b"]
    folder, record = cached_checkpoint("mixtral_8x7b", 1, overrides=overrides)
    assert folder.parent == tmp_path and folder.name == cache_key("mixtral_8x7b", 1, 0, overrides)
    stamp = (folder / "scale.json").stat().st_mtime_ns
    again, second = cached_checkpoint("mixtral_8x7b", 1, overrides=overrides)
    assert again == folder and second == record and (folder / "scale.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no partial build left behind


def test_cgroup_text_parsing(tmp_path):
    assert parse_flat_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n") == {
        "oom_kill_disable": 0, "under_oom": 0, "oom_kill": 2}
    assert parse_flat_keyed("cache 4096\nrss 8192\nhierarchical_memory_limit 9223372036854771712\n")["rss"] == 8192
    (tmp_path / "jobs" / "a1").mkdir(parents=True)
    text = "5:devices:/\n4:memory:/jobs/a1\n0::/\n"
    assert own_memory_group(text, tmp_path) == tmp_path / "jobs" / "a1"
    assert own_memory_group("4:memory:/gone\n", tmp_path) == tmp_path  # not visible here: the root
    assert own_memory_group("3:cpu,cpuacct:/x\n", tmp_path) == tmp_path


def _fake_result(ok: bool, cap: int | None) -> CapResult:
    return CapResult(argv=[], cap_bytes=cap, ok=ok, returncode=0 if ok else -9, seconds=1.0, cpu_seconds=1.0,
                     max_usage=cap or 0, peak_rss=0, failcnt=0, oom_kills=0 if ok else 1)


@pytest.mark.parametrize("hint", [None, 350, 10, 10_000])
def test_smallest_cap_finds_the_boundary_in_fresh_output_folders(hint):
    fractions = (0.1, 0.2, 0.3, 0.4, 0.5)
    needed = 330  # bytes the fake command needs: fits from 0.4 of 1000 up
    outputs: list[Path] = []

    def factory(out: Path) -> list[str]:
        assert not out.exists()  # a fresh, absent output folder (moecompress refuses non-empty ones)
        outputs.append(out)
        return ["cmd", str(out)]

    def runner(argv, cap, timeout):
        Path(argv[1]).mkdir()
        return _fake_result(cap >= needed, cap)

    found = smallest_cap(factory, 1000, fractions, hint_bytes=hint, runner=runner)
    assert found.fraction == 0.4 and found.cap_bytes == 400
    tried = {a["fraction"]: a["ok"] for a in found.attempts}
    assert tried[0.4] and not tried[0.3]  # the boundary is proven on both sides
    assert len(found.attempts) == len(set(outputs)) and not any(p.exists() for p in outputs)
    if hint == 350:
        assert [a["fraction"] for a in found.attempts] == [0.4, 0.3]


def test_smallest_cap_when_nothing_fits():
    found = smallest_cap(lambda out: ["cmd"], 1000, (0.1, 0.2), runner=lambda argv, cap, t: _fake_result(False, cap))
    assert found.fraction is None and found.cap_bytes is None and found.result is None
    assert [a["outcome"] for a in found.attempts] == ["oom", "oom"]


def test_fits():
    assert fit.seconds_per_layer((2, 100.0), (8, 400.0)) == 50.0
    assert fit.extrapolate((2, 100.0), 50.0, 48) == 2400.0
    sizes = [1.0, 2.0, 4.0, 8.0]
    exponent, r2 = fit.power_law_exponent(sizes, [3 * s ** 1.5 for s in sizes])
    assert exponent == pytest.approx(1.5) and r2 == pytest.approx(1.0)
    with pytest.raises(ValueError):
        fit.power_law_exponent([1.0, 1.0], [1.0, 2.0])


def test_progress_bar_phases():
    text = ("calibrating:   0%|          | 0/8 [00:00<?, ?layer/s]\rcalibrating:  50%|#####     | 4/8 "
            "[05:30<05:30, 82.5s/layer]\rcalibrating: 100%|##########| 8/8 [1:02:04<00:00, 83.1s/layer]\n"
            "copying kept tensors: 100%|##########| 300/300 [00:09<00:00, 31.2tensor/s]\n")
    phases = bar_phases(text)["phases"]
    assert phases["calibrating"] == {"done": 8, "total": 8, "seconds": 3724}
    assert phases["copying kept tensors"]["seconds"] == 9
    assert bar_phases("no bars") == {}


def test_commands_are_data():
    labels = [c.label for c in COMMANDS]
    assert labels[:4] == ["calibrate", "prune frequency", "prune reap", "prune easy_ep"]
    assert all(c.enabled for c in COMMANDS)
    slow = {c.label: (c.timing_depths, c.cap_fractions) for c in COMMANDS if c.cap_fractions}
    assert slow == {"quantize 2.5 bits": ((2, 4), (0.4,)), "quantize 2.5 bits, gemq": ((2,), (0.4,)),
                    "compress 40%": ((2, 4), (0.4,))}
    argv = COMMANDS[1].argv(Path("/ck"), Path("/out"))
    assert argv[:3] == [sys.executable, "-m", "moecompress"]
    assert argv[3:] == ["prune", "/ck", "--method", "frequency", "--ratio", "0.5", "--samples", "8", "--seq-len",
                        "256", "-o", "/out"]
    assert "--no-protect-super-experts" not in argv


def test_suite_end_to_end_with_a_fake_runner(tmp_path, monkeypatch):
    """Every step of the suite and its Markdown, on shrunken checkpoints, with the child runs faked."""
    from benchmarks.scale import suite as scale_suite

    monkeypatch.setenv("MOECOMPRESS_SCALE_DIR", str(tmp_path))
    monkeypatch.setattr(scale_suite, "unavailable_reason", lambda: None)

    def fake_run(argv, cap, timeout, cwd=None, env=None, parse_stderr=None):
        layers = int(re.search(r"-L(\d+)-", argv[4]).group(1))
        need = 1000 + 100 * layers
        ok = cap is None or cap >= need
        Path(argv[argv.index("-o") + 1]).mkdir()
        seconds = 10.0 + 5.0 * layers
        return CapResult(argv=list(argv), cap_bytes=cap, ok=ok, returncode=0 if ok else -9, seconds=seconds,
                         cpu_seconds=2 * seconds, max_usage=need, peak_rss=need, failcnt=0, oom_kills=0 if ok else 1,
                         parsed=parse_stderr(f"calibrating: 100%|#| {layers}/{layers} [00:{layers:02d}<00:00]")
                         if parse_stderr else {})

    monkeypatch.setattr(scale_suite, "run_capped", fake_run)
    options = {"scale_quick": True, "scale_overrides": SHRUNK["qwen3_30b_a3b"],
               "scale_commands": ["calibrate", "prune reap"], "scale_fractions": (0.001, 0.005, 0.5, 1.0)}
    data = scale_suite.scale([], options)
    assert [(row["command"], row["layers"]) for row in data["timings"]] == [
        ("calibrate", 1), ("calibrate", 2), ("prune reap", 1), ("prune reap", 2)]
    assert all(row["ok"] and row["output_bytes"] == 0 for row in data["timings"])
    by_command = {f["command"]: f for f in data["fits"]}
    assert by_command["calibrate"]["wall_seconds_per_layer"] == 5.0
    assert by_command["calibrate"]["wall_full_depth_seconds"] == 15.0 + 47 * 5.0
    assert "size_exponent" in by_command["calibrate"] and "size_exponent" not in by_command["prune reap"]
    size = data["checkpoints"]["2"]["bytes"]
    expected = min(f for f in (0.001, 0.005, 0.5, 1.0) if f * size >= 1200)
    assert [cap["fraction"] for cap in data["caps"]] == [expected, expected]
    assert data["pending"] == []
    assert data["code"]["source"] == "worktree" and len(data["code"]["sha256"]) == 64
    text = "\n".join(scale_suite.render_scale(data))
    assert "cgroup-v1" in text and "| calibrate |" in text and "exponent b" in text and "Not measured" not in text
    assert "Quick (smoke) run" in text and "Failures" not in text

    # a slow command: timed at its own depths, then run once at the cap depth under its own target cap
    slow = scale_suite.scale([], {"scale_overrides": SHRUNK["qwen3_30b_a3b"], "scale_commands": ["quantize 2.5 bits"],
                                  "scale_sweep_depths": (1, 2), "scale_cap_depth": 8})
    assert [(row["command"], row["layers"]) for row in slow["timings"]] == [("quantize 2.5 bits", 2),
                                                                          ("quantize 2.5 bits", 4)]
    [cap] = slow["caps"]
    assert cap["fractions"] == [0.4] and cap["direct"] and len(cap["attempts"]) == 1 and cap["layers"] == 8
    assert cap["fraction"] == (0.4 if 0.4 * slow["checkpoints"]["8"]["bytes"] >= 1800 else None)
    assert {f["command"]: f["depths"] for f in slow["fits"]} == {"quantize 2.5 bits": [2, 4]}
    given = scale_suite.settings({"scale_timing_depths": (1, 2)})  # explicit depths apply to every command
    assert scale_suite.timing_depths(next(c for c in COMMANDS if c.cap_fractions), given) == (1, 2)

    # a run stopped early is rebuilt from its progress records (those after its start record)
    records = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("start") == 2
    settings_slow = scale_suite.settings({"scale_overrides": SHRUNK["qwen3_30b_a3b"], "scale_cap_depth": 8})
    rebuilt = scale_suite.recover(settings_slow, records)
    assert rebuilt["recovered"] and rebuilt["code"] == slow["code"] and rebuilt["timings"] == slow["timings"]
    assert [(c["fraction"], c["direct"], len(c["attempts"])) for c in rebuilt["caps"]] == [(cap["fraction"], True, 1)]
    assert "stopped before its last command finished" in "\n".join(scale_suite.render_scale(rebuilt))
    assert rebuilt["pending"] == []
    planned = scale_suite.settings({**{"scale_overrides": SHRUNK["qwen3_30b_a3b"], "scale_cap_depth": 8},
                                    "scale_commands": ["quantize 2.5 bits", "compress 40%"]})
    [missing] = scale_suite.recover(planned, records)["pending"]  # planned, but the run never reached it
    assert missing["command"] == "compress 40%" and "stopped before" in missing["note"]

    # merged into the stored run: the earlier run's other commands stay, each saying where it came from
    stored = {"environment": {"date": "2026-12-01T23:23:14+00:00"}, "seconds": 600.0, "data": data}
    merged = scale_suite.merge_runs(stored, slow)
    assert [c["command"] for c in merged["commands"]] == ["calibrate", "prune reap", "quantize 2.5 bits"]
    assert [(r["command"], r["layers"]) for r in merged["timings"]] == [
        ("calibrate", 1), ("calibrate", 2), ("prune reap", 1), ("prune reap", 2), ("quantize 2.5 bits", 2),
        ("quantize 2.5 bits", 4)]
    assert sorted(merged["checkpoints"], key=int) == list(merged["checkpoints"]) == ["1", "2", "4", "8"]
    assert {p["command"]: p["note"] for p in merged["pending"]} == {
        c.label: "not measured in these runs" for c in COMMANDS
        if c.label not in ("calibrate", "prune reap", "quantize 2.5 bits")}
    assert merged["merged_from"] == [{"commands": ["calibrate", "prune reap"], "date": "2026-12-01T23:23:14+00:00",
                                      "commit": data["code"]["commit"], "source": "worktree", "minutes": 10.0}]
    again = scale_suite.merge_runs({"environment": {"date": "later"}, "seconds": 60.0, "data": merged},
                                   {**slow, "commands": [{"command": "prune reap"}], "timings": [], "fits": [],
                                    "caps": []})
    assert [run["commands"] for run in again["merged_from"]] == [["calibrate"], ["quantize 2.5 bits"]]
    text = "\n".join(scale_suite.render_scale(merged))
    assert "Rows from earlier runs" in text and "calibrate, prune reap: run 2026-12-01" in text
    assert "quantize 2.5 bits is tried at 0.4 only (its target cap" in text
    assert "calibrate is tried at 0.001, 0.005, 0.5, 1 only;" in text  # the earlier run searched its own fractions


@pytest.mark.parametrize("source", ["head", "worktree"])
def test_frozen_package_is_what_children_import(tmp_path, source):
    import subprocess

    from benchmarks.scale.snapshot import freeze

    record = freeze(Path(__file__).resolve().parents[2], tmp_path, source)
    assert record["source"] == source and (tmp_path / "moecompress" / "__main__.py").is_file()
    assert not list(tmp_path.rglob("__pycache__"))
    found = subprocess.run([sys.executable, "-c", "import moecompress; print(moecompress.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found).is_relative_to(tmp_path)


def test_run_capped_under_a_real_cgroup():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"capped runs unavailable here: {reason}")
    grab = ("import sys; b = bytearray(int(sys.argv[1])); b[::4096] = b'x' * len(b[::4096]); "
            "print('done', flush=True)")
    mib = 1024 ** 2
    small = run_capped([sys.executable, "-c", grab, str(200 * mib)], 100 * mib, 60)
    assert not small.ok and small.outcome == "oom" and small.oom_kills >= 1 and small.max_usage <= 100 * mib
    roomy = run_capped([sys.executable, "-c", grab, str(200 * mib)], 600 * mib, 60)
    assert roomy.ok and roomy.stdout_tail == ["done"] and roomy.max_usage >= 200 * mib
    # peak_rss is sampled every 50 ms: on a busy machine the last sample may precede the last touched pages
    assert roomy.peak_rss >= 50 * mib and roomy.cpu_seconds > 0
    slow = run_capped([sys.executable, "-c", "import time; time.sleep(30)"], None, 1)
    assert slow.timed_out and slow.outcome == "timeout" and slow.returncode is None


def test_a_command_over_ranks_is_launched_by_torchrun() -> None:
    from benchmarks.scale.commands import COMMANDS

    command = next(c for c in COMMANDS if c.ranks == 2)
    argv = command.argv(Path("/ckpt"), Path("/out"))
    at = argv.index("torch.distributed.run")
    assert argv[at + 1 : at + 3] == ["--nproc-per-node", "2"] and argv[argv.index("-m", at) + 1] == "moecompress"
    assert command.text().startswith("torchrun --nproc-per-node 2 -m moecompress quantize CKPT")
    assert not command.capped
