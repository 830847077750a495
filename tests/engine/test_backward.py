"""The backward pass one decoder layer at a time gives the whole-model backward's gradients."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from moecompress.engine.backward import stream_backward
from moecompress.engine.layers import LayerEngine
from moecompress.engine.reader import CheckpointReader
from moecompress.engine.spill import SpilledActivations
from moecompress.errors import MoecompressError
from moecompress.models.adapters import get_adapter
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.engine.test_expert_groups import _budget_for
from tests.helpers import tiny_model, token_batch

LAYERWISE = sorted(name for name in TINY_CONFIGS
                   if get_adapter(tiny_model(TINY_CONFIGS[name]())).layerwise_supported)


@contextlib.contextmanager
def output_gradients(layer: torch.nn.Module, store: list[torch.Tensor]) -> Iterator[None]:
    """Append dLoss/d(the layer's output) to `store` each time the layer's output is backpropagated."""
    def hook(module, args, output):  # noqa: ANN001, ANN202
        out = output[0] if isinstance(output, tuple) else output
        if out.requires_grad:
            out.register_hook(lambda grad: store.append(grad.detach().clone()))

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def whole_model_gradients(model: torch.nn.Module, batches: list[tuple[str, torch.Tensor]]
                          ) -> tuple[list[float], dict[int, list[torch.Tensor]]]:
    """(loss per batch, per decoder layer its output's gradient per batch) from ordinary backward passes."""
    layers = get_adapter(model).decoder_layers(model)
    grads: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    losses = []
    with contextlib.ExitStack() as stack:
        for i, layer in enumerate(layers):
            stack.enter_context(output_gradients(layer, grads[i]))
        emb = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        stack.callback(emb.remove)
        for p in model.parameters():
            p.requires_grad_(False)
        for _, ids in batches:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            losses.append(float(loss.detach()))
    for p in model.parameters():
        p.requires_grad_(True)
    return losses, grads


def streamed_gradients(engine: LayerEngine, batches: list[tuple[str, torch.Tensor]]
                       ) -> tuple[float, dict[int, list[torch.Tensor]]]:
    grads: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(engine.layers))}
    seen_order = []

    def hooks(index: int):  # noqa: ANN202
        seen_order.append(index)
        return output_gradients(engine.layers[index], grads[index])

    loss = stream_backward(engine, batches, hooks, progress=False)
    assert seen_order == list(reversed(range(len(engine.layers))))  # last layer first
    return loss, grads


def assert_streamed_equals_whole_model(model_type: str) -> torch.nn.Module:
    """Two batches through a tiny float32 model of `model_type`: the streamed loss and gradients equal the whole
    model's at every decoder layer; returns the model."""
    model = tiny_model(TINY_CONFIGS[model_type](), seed=0).float()
    ids = token_batch(model.config.vocab_size, batch=4, length=12)
    batches = [("a", ids[:2]), ("b", ids[2:])]
    losses, expected = whole_model_gradients(model, batches)
    loss, got = streamed_gradients(LayerEngine(model, get_adapter(model)), batches)
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    for index, grads in expected.items():
        assert len(got[index]) == len(grads) == 2, index
        for mine, theirs in zip(got[index], grads):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7, msg=f"decoder layer {index}")
    return model


@pytest.mark.parametrize("model_type", LAYERWISE)
def test_streamed_gradients_equal_the_whole_model_backward(model_type: str) -> None:
    model = assert_streamed_equals_whole_model(model_type)
    assert all(p.requires_grad for p in model.parameters())  # parameters unfrozen afterwards
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was computed


@pytest.mark.parametrize("model_type", ["qwen3_moe", "cohere2_moe", "granitemoe", "deepseek_v3"])
def test_the_head_in_slices_of_positions_gives_the_same_gradients(model_type: str, monkeypatch) -> None:
    """One position per slice through the final norm and head (scaled or not): the whole batch's loss and gradients."""
    from moecompress.engine import backward

    monkeypatch.setattr(backward, "LOGIT_BYTES", 1)
    assert_streamed_equals_whole_model(model_type)


@pytest.mark.parametrize("spill", [False, True])
def test_a_checkpoint_read_layer_by_layer_gives_the_same_gradients(tmp_path, spill: bool) -> None:
    model = tiny_model(TINY_CONFIGS["deepseek_v3"](), seed=0).float()
    model.save_pretrained(tmp_path / "model")
    ids = token_batch(model.config.vocab_size, batch=4, length=12)
    batches = [("a", ids[:2]), ("b", ids[2:])]
    _, expected = whole_model_gradients(model, batches)
    reader = CheckpointReader(tmp_path / "model", dtype="float32")
    files = SpilledActivations(tmp_path / "spill") if spill else None
    engine = LayerEngine(reader.model, reader.adapter, reader=reader, spill=files)
    _, got = streamed_gradients(engine, batches)
    for index, grads in expected.items():
        for mine, theirs in zip(got[index], grads):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7, msg=f"decoder layer {index}")
    assert all(p.device.type == "meta" for p in reader.model.parameters())  # every layer released
    if files is not None:
        assert [p.name for p in (tmp_path / "spill").iterdir()] == [files.folder.name]  # the kept inputs' files went
        files.close()


def test_a_layer_served_in_expert_groups_is_refused(tmp_path) -> None:
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    model.save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path, dtype="float32")
    engine = LayerEngine(reader.model, reader.adapter, reader=reader, max_layer_bytes=_budget_for(reader, 3))
    ids = token_batch(model.config.vocab_size, batch=2, length=8)
    with pytest.raises(MoecompressError, match="group of experts at a time.*raise --max-memory"):
        stream_backward(engine, [("a", ids)], progress=False)


def test_experts_kept_in_bfloat16_give_the_float32_gradients(tmp_path) -> None:
    """`auto` on the CPU: bfloat16 experts widened one at a time (run_experts), activations in float32."""
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model")
    model = model.float()  # the same values in float32: the whole-model reference
    ids = token_batch(model.config.vocab_size, batch=4, length=12)
    batches = [("a", ids[:2]), ("b", ids[2:])]
    _, expected = whole_model_gradients(model, batches)
    reader = CheckpointReader(tmp_path / "model", dtype="auto")
    assert reader.mixed_precision  # experts stay in bfloat16
    _, got = streamed_gradients(LayerEngine(reader.model, reader.adapter, reader=reader), batches)
    # the decoder's activations equal the float32 model's exactly; the reader keeps the output head in bfloat16
    # (it computes the logits in it, as eval does), which moves every gradient by well under 1% of its largest entry
    for index, grads in expected.items():
        for mine, theirs in zip(got[index], grads):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-2 * float(theirs.abs().max()),
                                       msg=f"decoder layer {index}")


def test_calibrate_gradients_streams_and_equals_the_whole_model_statistics(tmp_path, monkeypatch, capsys) -> None:
    """`moecompress calibrate --gradients` reads the checkpoint layer by layer (header mode) with the same statistics."""
    from moecompress.calibration.stats import RoutingStats
    from tests.cli_helpers import make_checkpoint, run_cli

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    calib = ["--samples", "2", "--seq-len", "16", "--gradients", "--dtype", "float32"]
    code, _, err = run_cli(["calibrate", str(checkpoint), *calib, "-o", str(tmp_path / "streamed")], monkeypatch,
                           capsys)
    assert code == 0, err
    code, _, err = run_cli(["calibrate", str(checkpoint), *calib, "--whole-model", "-o", str(tmp_path / "whole")],
                           monkeypatch, capsys)
    assert code == 0, err
    streamed, whole = RoutingStats.load(tmp_path / "streamed"), RoutingStats.load(tmp_path / "whole")
    assert streamed.header.mode == "layerwise" and whole.header.mode == "whole-model"
    assert "neuron_grad_proj" in streamed.header.statistics
    assert streamed.tensors.keys() == whole.tensors.keys()
    for key, tensor in whole.tensors.items():
        torch.testing.assert_close(streamed.tensors[key], tensor, rtol=1e-5, atol=1e-9, msg=key)


def test_no_weight_is_kept_or_differentiated_even_when_loaded_requiring_grad(tmp_path, monkeypatch) -> None:
    """Weights the checkpoint hands back as parameters requiring grad are frozen while each layer is backpropagated,
    so bfloat16 experts go through the product that keeps them narrow for backward (no float32 copy kept)."""
    import torch.nn as nn

    from moecompress.models import widened_matmul

    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model")
    reader = CheckpointReader(tmp_path / "model", dtype="auto")  # bfloat16 experts, float32 activations
    real_set = CheckpointReader._set

    def set_requiring_grad(self, name, value):  # noqa: ANN001, ANN202
        real_set(self, name, nn.Parameter(value.detach(), requires_grad=True) if value.is_floating_point() else value)

    monkeypatch.setattr(CheckpointReader, "_set", set_requiring_grad)
    calls = []
    real_apply = widened_matmul._WidenedMatmul.apply
    monkeypatch.setattr(widened_matmul._WidenedMatmul, "apply", lambda *a: calls.append(1) or real_apply(*a))
    ids = token_batch(model.config.vocab_size, batch=2, length=8)
    stream_backward(LayerEngine(reader.model, reader.adapter, reader=reader), [("a", ids)], progress=False)
    assert calls  # the experts' products kept their bfloat16 weights for backward
    assert all(p.grad is None for p in reader.model.parameters())
