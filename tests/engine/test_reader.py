"""CheckpointReader: one decoder layer at a time gives exactly what from_pretrained builds."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.engine.layers import LayerEngine
from moecompress.engine.reader import CheckpointReader
from moecompress.errors import MoecompressError
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_each_layer_equals_from_pretrained(model_type, tmp_path) -> None:
    tiny_model(TINY_CONFIGS[model_type]()).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    expected = reference.state_dict()
    reader = CheckpointReader(tmp_path, dtype="float32")
    assert not reader.unmatched
    for layer in reader.adapter.decoder_layers(reader.model):
        prefix = reader.module_path(layer)
        with reader.loaded(layer):
            for name, tensor in layer.state_dict().items():
                assert torch.equal(tensor, expected[f"{prefix}.{name}"]), f"{prefix}.{name}"
        assert all(p.device.type == "meta" for p in layer.parameters())


def test_engine_over_reader_reproduces_hidden_states(tmp_path) -> None:
    """Hidden states after every layer equal the in-memory model's (output_hidden_states)."""
    model = tiny_model(TINY_CONFIGS["deepseek_v3"]())
    model.save_pretrained(tmp_path)
    ids = token_batch(model.config.vocab_size, batch=2, length=10)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
    reader = CheckpointReader(tmp_path, dtype="float32")
    engine = LayerEngine.from_reader(reader)
    engine.prepare([("all", ids)])
    torch.testing.assert_close(engine.batches[0].hidden, expected[0], rtol=0, atol=0)
    for index in range(len(engine.layers)):
        engine.run_layer(index)
        if index < len(engine.layers) - 1:  # the last entry of hidden_states is after the final norm
            torch.testing.assert_close(engine.batches[0].hidden, expected[index + 1], rtol=1e-6, atol=1e-6)
    assert all(p.device.type == "meta" for p in reader.model.parameters())


def test_auto_dtype_keeps_experts_stored_and_computes_in_float32_on_cpu(tmp_path) -> None:
    """`auto` on the CPU: experts stay bfloat16, the rest float32; the engine then gives the float32 model's
    statistics (the same bfloat16 weights, widened), with every layer's experts read in bfloat16."""
    from moecompress.calibration.calibrate import collect_statistics
    from moecompress.calibration.request import ObservedPass

    model = tiny_model(TINY_CONFIGS["qwen3_moe"]()).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path)
    assert (reader.dtype, reader.expert_dtype) == (torch.float32, torch.bfloat16) and reader.mixed_precision
    explicit = CheckpointReader(tmp_path, dtype="bfloat16")
    assert (explicit.dtype, explicit.expert_dtype) == (torch.bfloat16, torch.bfloat16)
    widened = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    adapter = reader.adapter
    ids = token_batch(model.config.vocab_size, batch=2, length=12)
    domains = torch.zeros(2, dtype=torch.long)
    expected = collect_statistics(widened, adapter, ids, domains, ["all"], ObservedPass(mode="whole-model"), False)
    got = collect_statistics(reader.model, adapter, ids, domains, ["all"], ObservedPass(reader=reader), False)
    a, b = expected.tensors(), got.tensors()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    layer = adapter.moe_layers(reader.model)[0]
    with reader.loaded(reader.adapter.decoder_layers(reader.model)[layer.index]):
        assert all(p.dtype == torch.bfloat16 for p in layer.experts.parameters())
        assert layer.router.weight.dtype == torch.float32
    assert reader.model.get_input_embeddings().weight.dtype == torch.bfloat16  # a lookup: kept as stored


def test_missing_and_misshapen_tensors_are_one_line_errors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    tiny_model(TINY_CONFIGS["qwen3_moe"]()).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    name = next(k for k in state if "layers.1.self_attn.q_proj" in k)
    broken = dict(state)
    broken[name] = torch.zeros(3, 3)
    save_file(broken, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reader = CheckpointReader(tmp_path, dtype="float32")
    with pytest.raises(MoecompressError, match="shape .* does not match its config"):
        reader.load(reader.adapter.decoder_layers(reader.model)[1])
    del broken[name]
    save_file(broken, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reader = CheckpointReader(tmp_path, dtype="float32")
    with pytest.raises(MoecompressError, match="no tensor for .*q_proj"):
        reader.load(reader.adapter.decoder_layers(reader.model)[1])
