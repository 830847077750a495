"""A MoE layer larger than the memory budget: its routed experts computed a group at a time."""

from __future__ import annotations

import pytest
import torch

from moecompress.calibration.calibrate import collect_statistics, layer_budget
from moecompress.engine.working_memory import WORKING_FACTOR, layer_working_bytes, working_elements_per_token
from moecompress.calibration.request import CalibrationRequest, ObservedPass
from moecompress.calibration.observer import DEFAULT_STATISTICS, DENSE_STATISTICS
from moecompress.engine.layers import LayerEngine
from moecompress.engine.reader import CheckpointReader
from moecompress.errors import MoecompressError
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.cli_helpers import error_lines, make_checkpoint, run_cli
from tests.helpers import tiny_model, token_batch

ARCHS = ["qwen3_moe", "deepseek_v3", "mixtral", "gpt_oss"]


def _budget_for(reader: CheckpointReader, experts_per_group: int) -> int:
    """A layer budget that holds a MoE layer's other weights plus `experts_per_group` experts."""
    engine = LayerEngine.from_reader(reader)
    ref = next(iter(engine._moe.values()))
    keys = reader.layer_keys(ref.index)
    prefix = reader.module_path(ref.experts) + "."
    dense = reader.keys_bytes([k for k in keys if not k.startswith(prefix)])
    per_expert = int(1.5 * (reader.layer_bytes(ref.index) - dense) / ref.num_experts)
    return dense + experts_per_group * per_expert + 1


@pytest.mark.parametrize("model_type", ARCHS)
def test_grouped_layers_give_the_ungrouped_hidden_states_and_statistics(model_type: str, tmp_path) -> None:
    """Including mean_output, whose every-expert-on-every-token pass also runs group by group."""
    model = tiny_model(TINY_CONFIGS[model_type]())
    model.save_pretrained(tmp_path)
    ids = token_batch(model.config.vocab_size, batch=4, length=12)
    domain_ids = torch.tensor([0, 0, 1, 1])

    def observe(max_layer_bytes: int | None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], LayerEngine]:
        reader = CheckpointReader(tmp_path, dtype="float32")
        engine = LayerEngine.from_reader(reader, max_layer_bytes=max_layer_bytes)
        observer = collect_statistics(reader.model, reader.adapter, ids, domain_ids, ["a", "b"],
                                      ObservedPass(statistics=DEFAULT_STATISTICS + DENSE_STATISTICS, batch_size=2,
                                                   reader=reader, max_layer_bytes=max_layer_bytes))
        engine.prepare([("all", ids)])
        for index in range(len(engine.layers)):
            engine.run_layer(index)
        return observer.tensors(), [engine.batches[0].hidden], engine

    expected, hidden, _ = observe(None)
    reader = CheckpointReader(tmp_path, dtype="float32")
    budget = _budget_for(reader, 3)
    got, grouped_hidden, engine = observe(budget)
    grouped = [engine.expert_grouping(ref.index) for ref in engine._moe.values()]
    assert all(g is not None and len(g[1].groups) > 1 for g in grouped)
    assert max(len(group) for group in grouped[0][1].groups) == 3
    assert grouped[0][1].loads > 0
    torch.testing.assert_close(grouped_hidden[0], hidden[0], rtol=1e-5, atol=1e-5)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert all(p.device.type == "meta" for p in engine.model.parameters())


def test_a_budget_below_one_expert_is_refused(tmp_path) -> None:
    model = tiny_model(TINY_CONFIGS["qwen3_moe"]())
    model.save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path, dtype="float32")
    engine = LayerEngine.from_reader(reader, max_layer_bytes=_budget_for(reader, 0) - 1024)
    with pytest.raises(MoecompressError, match="needs at least .* one expert"):
        engine.expert_grouping(next(iter(engine._moe)))


def test_layer_budget_leaves_room_for_activations(tmp_path) -> None:
    model = tiny_model(TINY_CONFIGS["qwen3_moe"]())
    model.save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path, dtype="float32")
    hidden = model.config.hidden_size
    left = layer_budget(reader, (4, 16), 10_000_000)  # one batch of all 4 windows
    assert left == 10_000_000 - 2 * 4 * 16 * hidden * 4 - layer_working_bytes(reader, 4, 16)
    left_small_batches = layer_budget(reader, (4, 16), 10_000_000, batch_rows=1)
    assert left_small_batches == 10_000_000 - 5 * 16 * hidden * 4 - layer_working_bytes(reader, 1, 16)
    with pytest.raises(MoecompressError, match="cannot hold the calibration activations"):
        layer_budget(reader, (4, 16), 1000)


def test_calibrate_cli_max_memory(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    code, _, err = run_cli(["calibrate", str(checkpoint), "--samples", "2", "--seq-len", "16", "--max-memory",
                            "10KB", "-o", str(tmp_path / "s")], monkeypatch, capsys)
    (line,) = error_lines(err)
    assert code != 0 and "--max-memory" in line and not (tmp_path / "s").exists()
    code, _, err = run_cli(["calibrate", str(checkpoint), "--max-memory", "lots", "-o", str(tmp_path / "s")],
                           monkeypatch, capsys)
    (line,) = error_lines(err)
    assert code != 0 and "4GiB" in line
    code, out, err = run_cli(["calibrate", str(checkpoint), "--samples", "2", "--seq-len", "16", "--max-memory",
                              "2GiB", "-o", str(tmp_path / "s")], monkeypatch, capsys)
    assert code == 0, err


def test_auto_dtype_narrows_when_float32_copies_do_not_fit(tmp_path) -> None:
    """`auto` on the CPU widens the weights outside the experts to float32 only when that fits the budget."""
    from moecompress.calibration.calibrate import activation_bytes, calibrate, widest_dense_bytes
    from tests.cli_helpers import make_checkpoint

    folder = make_checkpoint(tmp_path / "ckpt", "deepseek_v3")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    wide = CheckpointReader(folder)  # auto: float32 outside the experts, bf16 experts
    narrow = CheckpointReader(folder, dtype=torch.bfloat16)
    assert wide.mixed_precision
    samples, seq_len = 2, 16
    activations = activation_bytes(wide, (3 * samples, seq_len), CalibrationRequest().batch_size)  # three domains
    outside = wide.keys_bytes(wide.outside_layers(include_head=False))
    budget = activations + max(outside, widest_dense_bytes(narrow)) + 1
    assert widest_dense_bytes(wide) > budget - activations
    stats = calibrate(folder, CalibrationRequest(samples=samples, seq_len=seq_len, max_memory=budget), progress=False)
    assert stats.header.data["compute_dtype"] == "bfloat16"
    roomy = calibrate(folder, CalibrationRequest(samples=samples, seq_len=seq_len, max_memory=10 * 2**30),
                      progress=False)
    assert roomy.header.data["compute_dtype"] == "float32"


def test_working_memory_counts_the_linears_outputs_and_the_attention_scores(tmp_path) -> None:
    """Per token of the widest layer: its linears' outputs outside the routed experts, scores and probabilities per head."""
    model = tiny_model(TINY_CONFIGS["qwen3_moe"]())
    model.save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path, dtype="float32")
    c = model.config
    head_dim = c.head_dim
    attention = c.num_attention_heads * head_dim + 2 * c.num_key_value_heads * head_dim + c.hidden_size  # q, k, v, o
    assert c.mlp_only_layers  # the widest layer is a dense one: attention, then gate, up and down
    linears = attention + 2 * c.intermediate_size + c.hidden_size
    seq_len = 16
    assert working_elements_per_token(reader, seq_len) == linears + 2 * c.num_attention_heads * seq_len + 2 * c.hidden_size
    assert layer_working_bytes(reader, 3, seq_len) == int(WORKING_FACTOR * 4 * 3 * seq_len
                                                          * working_elements_per_token(reader, seq_len))
    narrow = CheckpointReader(tmp_path, dtype="bfloat16")
    assert layer_working_bytes(narrow, 3, seq_len) == int(WORKING_FACTOR * 4 * 3 * seq_len  # float32 regardless
                                                          * working_elements_per_token(narrow, seq_len))


def test_a_batch_whose_working_set_does_not_fit_is_halved(tmp_path, caplog) -> None:  # noqa: ANN001
    """Under a budget that holds the widest layer beside batches of 2 but not of 4, the pass runs batches of 2."""
    import logging

    from moecompress.calibration.calibrate import activation_bytes, calibrate, widest_dense_bytes
    from tests.cli_helpers import make_checkpoint

    folder = make_checkpoint(tmp_path / "ckpt")
    reader = CheckpointReader(folder)
    samples, seq_len, windows = 4, 32, 12  # three shipped domains
    budget = activation_bytes(reader, (windows, seq_len), 2) + widest_dense_bytes(reader) + 1
    assert activation_bytes(reader, (windows, seq_len), 4) + widest_dense_bytes(reader) > budget
    with caplog.at_level(logging.WARNING):
        lowered = calibrate(folder, CalibrationRequest(samples=samples, seq_len=seq_len, batch_size=8,
                                                       max_memory=budget), progress=False)
    assert "lowering --batch-size from 8 to 2" in caplog.text
    assert lowered.header.data["batch_size"] == 2
    asked = calibrate(folder, CalibrationRequest(samples=samples, seq_len=seq_len, batch_size=2), progress=False)
    for name, tensor in asked.tensors.items():
        assert torch.equal(lowered.tensors[name], tensor), name
    too_small = activation_bytes(reader, (windows, seq_len), 1) + widest_dense_bytes(reader) - 1
    with pytest.raises(MoecompressError, match="widest decoder layer's weights outside the routed experts"):
        calibrate(folder, CalibrationRequest(samples=samples, seq_len=seq_len, max_memory=too_small), progress=False)


def test_each_group_hands_its_freed_memory_back(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """glibc keeps a released group's tensors in its heap unless trimmed: every group load ends with a trim."""
    import moecompress.engine.expert_groups as expert_groups

    model = tiny_model(TINY_CONFIGS["deepseek_v3"]())
    model.save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path, dtype="float32")
    ref = next(iter(LayerEngine.from_reader(reader)._moe.values()))
    groups = expert_groups.ExpertGroups(reader, expert_groups.group_experts(ref.num_experts, 2))
    trims = []
    monkeypatch.setattr(expert_groups, "return_freed_memory", lambda: trims.append(groups.loads))
    for group in groups.groups:
        with groups.loaded(ref.index, group) as loaded:
            assert all(p.device.type == "cpu" for p in loaded.experts.parameters())
        assert all(p.device.type == "meta" for p in loaded.experts.parameters())
    assert trims == list(range(1, len(groups.groups) + 1))
