"""`export gguf --sensitivity fisher`: the Fisher-weighted type errors, streamed one layer at a time.

The streamed measure must equal the same formula on gradients from one whole-model backward
per batch (transformers' model, every tensor hooked), and its separable form must be exact
when the Fisher has rank one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM

from moecompress.engine.reader import CheckpointReader
from moecompress.export.gguf import plan_tensors, tensor_groups
from moecompress.export.gguf_allocate import tensor_choices
from moecompress.export.gguf_budget import GGUFBudget
from moecompress.export.gguf_fisher import FisherMoment, _expert_errors, _split_errors, measure_fisher_errors
from moecompress.export.gguf_mix import MixOptions, calibration_batches
from moecompress.export.gguf_sensitivity import SensitivityRequest, layer_linears, roundtrip
from moecompress.export.refusals import refuse_unexportable
from moecompress.io.gguf.names import GGUFNames
from tests.cli_helpers import error_lines, run_cli

TYPES = [Q.Q4_0, Q.Q8_0]


def test_separable_error_is_exact_for_rank_one_fisher() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 32, generator=gen, dtype=torch.float64)  # (N, in)
    a, b = torch.rand(50, 1, generator=gen, dtype=torch.float64), torch.rand(1, 8, generator=gen, dtype=torch.float64)
    signs = torch.randint(0, 2, (50, 8), generator=gen).double() * 2 - 1
    grad = signs * a * b  # (N, rows): F = grad^2 = a^2 b^2 has rank one
    delta = torch.randn(8, 32, generator=gen, dtype=torch.float64)  # D (rows, in)
    moment = FisherMoment(32, 8)
    moment.add(x[:20], grad[:20])
    moment.add(x[20:], grad[20:])
    brute = float(((grad ** 2) * (x @ delta.T) ** 2).sum())
    assert moment.error(delta.numpy()) == pytest.approx(brute, rel=1e-10)


def _wanted(folder: Path) -> tuple[dict[str, list[Q]], GGUFNames, Any]:
    config, spec = refuse_unexportable(folder)
    reader = CheckpointReader(folder, dtype="auto")
    names = GGUFNames(spec, int(config.num_hidden_layers))
    planned = plan_tensors(tensor_groups(reader, names, spec), reader.model, "f32")
    choices = tensor_choices([(t.name, t.shape) for t in planned], bool(getattr(config, "tie_word_embeddings", False)),
                             tuple(TYPES))
    return {c.name: list(TYPES) for c in choices if c.fixed is None}, names, spec


def _whole_model_errors(folder: Path, names: GGUFNames, spec: Any, request: SensitivityRequest) -> dict:
    """The same errors from one whole-model backward per batch: every linear, MoE block and the embedding hooked."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.requires_grad_(False)
    reader = CheckpointReader(folder, dtype="float32")
    adapter = reader.adapter
    refs = {ref.index: ref for ref in adapter.moe_layers(model)}
    layers = list(range(int(model.config.num_hidden_layers)))
    linears = {index: {path: (model.get_submodule(path), key)
                       for path, (_, key) in layer_linears(reader, index, names, spec, request.wanted).items()}
               for index in layers}
    moments = {index: {path: FisherMoment(m.in_features, m.out_features) for path, (m, _) in linears[index].items()}
               for index in layers}
    recorded: dict[int, list] = {index: [] for index in refs}
    table = model.get_input_embeddings().weight.detach()
    squared: dict[int, torch.Tensor] = {}  # token id -> sum of (dLoss/dh_0)^2 (H,)
    handles = []
    for index in layers:
        for path, (module, _) in linears[index].items():
            def hook(mod, args, out, _m=moments[index][path]):  # noqa: ANN001, ANN202
                x = args[0].detach()
                out.register_hook(lambda g: _m.add(x, g))
            handles.append(module.register_forward_hook(hook))
    for index, ref in refs.items():
        def block_hook(mod, args, out, _rec=recorded[index], _ref=ref):  # noqa: ANN001, ANN202
            out = out[0] if isinstance(out, tuple) else out
            flat = args[0].detach().reshape(-1, args[0].shape[-1])
            entry = [flat, adapter.route(_ref, flat), None]
            _rec.append(entry)
            out.register_hook(lambda g: entry.__setitem__(2, g.detach().reshape(-1, g.shape[-1]).float()))
        handles.append(ref.block.register_forward_hook(block_hook))
    for _, ids in request.batches:
        def embed_hook(mod, args, out, _ids=ids):  # noqa: ANN001, ANN202
            out = out.detach().requires_grad_(True)

            def on_grad(g: torch.Tensor) -> None:
                for token, row in zip(_ids.reshape(-1).tolist(), g.reshape(-1, g.shape[-1]).double() ** 2):
                    squared[token] = squared.get(token, 0) + row
            out.register_hook(on_grad)
            return out
        handle = model.get_input_embeddings().register_forward_hook(embed_hook)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        handle.remove()
    for handle in handles:
        handle.remove()
    errors: dict = {}
    for index in layers:
        _split_errors(linears[index], moments[index], names, spec, model.config, request, errors)
        if index in refs:
            _expert_errors(adapter, refs[index], recorded[index], names, request, errors)
    if "token_embd.weight" in request.wanted:
        used = sorted(squared)
        rows = table[used].float().numpy()
        fisher = torch.stack([squared[t] for t in used]).numpy()
        errors["token_embd.weight"] = {t.name: float((fisher * (rows - roundtrip(rows, t)).astype(np.float64) ** 2)
                                                     .sum()) for t in request.wanted["token_embd.weight"]}
    return errors


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_streamed_fisher_errors_equal_whole_model_backward(tiny_dir: Any, example_dir: Path, model_type: str) -> None:
    folder = example_dir if model_type == "qwen3_moe" else tiny_dir(model_type)  # (the tiny qwen3_moe has dense layers)
    wanted, names, spec = _wanted(folder)
    mix = MixOptions(budget=GGUFBudget(bits=6.0), samples=2, seq_len=32, batch_size=2)
    batches = calibration_batches(folder, mix)
    streamed = measure_fisher_errors(folder, names, spec, SensitivityRequest(wanted, batches, progress=False))
    reference = _whole_model_errors(folder, names, spec, SensitivityRequest(wanted, batches, progress=False))
    assert set(streamed) == set(wanted) == set(reference)
    for name in wanted:
        for t in TYPES:
            assert streamed[name][t.name] == pytest.approx(reference[name][t.name], rel=1e-4, abs=1e-12), name
        assert streamed[name]["Q4_0"] > streamed[name]["Q8_0"] > 0, name  # every tensor felt by the loss


def test_cli_fisher_mix_records_its_measure(example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fisher.gguf"
    code, _, err = run_cli(["export", "gguf", str(example_dir), "-o", str(out), "--bits", "5.5", "--sensitivity",
                            "fisher", "--samples", "2", "--seq-len", "64", "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    record = json.loads(gguf.GGUFReader(out).fields["moecompress.manifest"].contents())["gguf"]["allocation"]
    assert record["sensitivity"] == "fisher"
    assert record["bits_per_weight"] <= 5.5


@pytest.mark.parametrize(("option", "message"), [(["--sensitivity", "hessian"], "not one of fisher, output"),
                                                  (["--device", "tpu"], "unknown device 'tpu'")])
def test_cli_bad_allocation_option_is_one_line(option: list[str], message: str, example_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["export", "gguf", str(example_dir), "-o", str(tmp_path / "x.gguf"), "--bits", "5.5",
                            *option], monkeypatch, capsys)
    assert code != 0
    lines = error_lines(err)
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "x.gguf").exists()
