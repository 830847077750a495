"""Every bad input is answered in one line: exit non-zero, one `error:` line saying what is wrong and what to do.

One parametrised matrix. Each case breaks a copy of a tiny good checkpoint (or its data, its
options, its output folder) and runs one command in-process through the console entry point;
the test then checks:

* the exit code is non-zero, stderr holds exactly one `error:` line and no traceback;
* the line names the problem (the case's expected words);
* the input folder is byte-identical before and after (sha256 of every file);
* no output folder appears (or a pre-existing one is untouched).

The cases that need no model (options, output folder) also run here, so the matrix is the
one list of what a user can get wrong and what they are told.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_helpers import error_lines, make_checkpoint, run_cli

CALIB = ["--samples", "2", "--seq-len", "16"]


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@dataclass(frozen=True)
class Case:
    """A broken input: `breaks(model, work)` edits the model copy (and writes data into `work`), returns argv."""

    breaks: Callable[[Path, Path], list[str]]
    expect: tuple[str, ...]  # words the error line must hold (lower case)


def _weights(model: Path) -> Path:
    return model / "model.safetensors"


def _edit_tensors(model: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(_weights(model)))
    edit(tensors)
    save_file(tensors, str(_weights(model)), metadata={"format": "pt"})


def _edit_config(model: Path, edit: Callable[[dict], None]) -> None:
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config))


def _expert_key(model: Path) -> str:
    return next(k for k in load_file(str(_weights(model))) if ".experts." in k and k.endswith(".weight"))


def no_config(model: Path, work: Path) -> list[str]:
    (model / "config.json").unlink()
    return ["prune", str(model), "--method", "frequency", "--ratio", "0.5", *CALIB, "-o", str(work / "out")]


def config_not_json(model: Path, work: Path) -> list[str]:
    (model / "config.json").write_text("{ this is not json")
    return ["inspect", str(model)]


def unknown_model_type(model: Path, work: Path) -> list[str]:
    _edit_config(model, lambda c: c.update(model_type="not_a_real_model"))
    return ["inspect", str(model)]


def dense_model(model: Path, work: Path) -> list[str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    for f in model.glob("*.safetensors"):
        f.unlink()
    (model / "config.json").unlink()
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model)
    return ["prune", str(model), "--method", "frequency", "--ratio", "0.5", *CALIB, "-o", str(work / "out")]


def truncated_safetensors(model: Path, work: Path) -> list[str]:
    data = _weights(model).read_bytes()
    _weights(model).write_bytes(data[: len(data) // 2])
    return ["calibrate", str(model), *CALIB, "-o", str(work / "out")]


def header_garbage(model: Path, work: Path) -> list[str]:
    _weights(model).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    return ["calibrate", str(model), *CALIB, "-o", str(work / "out")]


def missing_shard(model: Path, work: Path) -> list[str]:
    tensors = load_file(str(_weights(model)))
    index = {"metadata": {"total_size": 0},
             "weight_map": {k: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
                            for i, k in enumerate(tensors)}}
    first_shard = {k: v for i, (k, v) in enumerate(tensors.items()) if i % 2}
    save_file(first_shard, str(model / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    _weights(model).unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["calibrate", str(model), *CALIB, "-o", str(work / "out")]


def missing_tensor(model: Path, work: Path) -> list[str]:
    key = next(k for k in load_file(str(_weights(model))) if k.endswith("self_attn.q_proj.weight"))
    _edit_tensors(model, lambda t: t.pop(key))
    return ["calibrate", str(model), *CALIB, "-o", str(work / "out")]


def missing_expert_tensor(model: Path, work: Path) -> list[str]:
    key = _expert_key(model)
    _edit_tensors(model, lambda t: t.pop(key))
    return ["calibrate", str(model), *CALIB, "-o", str(work / "out")]


def wrong_shape(model: Path, work: Path) -> list[str]:
    key = _expert_key(model)
    _edit_tensors(model, lambda t: t.update({key: torch.zeros(t[key].shape[0] + 1, t[key].shape[1])}))
    return ["calibrate", str(model), *CALIB, "-o", str(work / "out")]


def unknown_quant_method(model: Path, work: Path) -> list[str]:
    _edit_config(model, lambda c: c.update(quantization_config={"quant_method": "superquant9000"}))
    return ["prune", str(model), "--method", "frequency", "--ratio", "0.5", *CALIB, "-o", str(work / "out")]


def no_tokenizer(model: Path, work: Path) -> list[str]:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    return ["calibrate", str(model), *CALIB, "-o", str(work / "out")]


def _data(write: Callable[[Path], None], name: str, extra: tuple[str, ...] = ()) -> Callable[[Path, Path], list[str]]:
    def breaks(model: Path, work: Path) -> list[str]:
        path = work / name
        write(path)
        return ["calibrate", str(model), "--data", str(path), *extra, *CALIB, "-o", str(work / "out")]

    return breaks


def recipe_missing_file(model: Path, work: Path) -> list[str]:
    recipe = work / "recipe.yaml"
    recipe.write_text(f"version: 1\nmodel: {model}\noutput: {work / 'out'}\nsteps:\n  - op: calibrate\n"
                      f"    data: [{work / 'no-such-file.txt'}]\n    samples: 2\n    seq_len: 16\n")
    return ["run", str(recipe)]


def output_not_empty(model: Path, work: Path) -> list[str]:
    (work / "out").mkdir()
    (work / "out" / "precious.txt").write_text("keep me")
    return ["calibrate", str(model), *CALIB, "-o", str(work / "out")]


def stats_of_another_model(model: Path, work: Path) -> list[str]:
    from moecompress.calibration.calibrate import calibrate
    from moecompress.calibration.request import CalibrationRequest

    other = make_checkpoint(work / "other", model_type="mixtral")
    calibrate(other, CalibrationRequest(samples=2, seq_len=16), progress=False).save(work / "other-stats")
    shutil.rmtree(other)
    return ["prune", str(model), "--stats", str(work / "other-stats"), "--method", "frequency", "--ratio", "0.5",
            "-o", str(work / "out")]


def _mount_tmpfs(folder: Path, options: str) -> None:
    """Mount a tmpfs at `folder` (root only); the test's finaliser unmounts it."""
    import subprocess

    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    MOUNTS.append(folder)


def read_only_output(model: Path, work: Path) -> list[str]:
    _mount_tmpfs(work / "ro", "ro,size=1m")
    return ["prune", str(model), "--method", "frequency", "--ratio", "0.5", *CALIB, "-o", str(work / "ro" / "out")]


def disk_fills_up(model: Path, work: Path) -> list[str]:
    _mount_tmpfs(work / "small", "size=64k")  # smaller than the pruned copy: the disk fills while shards are written
    return ["prune", str(model), "--method", "frequency", "--ratio", "0.5", *CALIB, "-o",
            str(work / "small" / "out")]


def _options(*args: str) -> Callable[[Path, Path], list[str]]:
    def breaks(model: Path, work: Path) -> list[str]:
        return [arg.format(model=model, out=work / "out") for arg in args]

    return breaks


CASES: dict[str, Case] = {
    "no-config": Case(no_config, ("config.json",)),
    "config-not-json": Case(config_not_json, ("config.json",)),
    "unknown-model-type": Case(unknown_model_type, ("not_a_real_model", "does not know", "qwen3_moe")),
    "dense-model": Case(dense_model, ("moe",)),
    "truncated-safetensors": Case(truncated_safetensors, ("model.safetensors",)),
    "safetensors-header-garbage": Case(header_garbage, ("model.safetensors",)),
    "shard-in-index-missing": Case(missing_shard, ("model-00002-of-00002.safetensors",)),
    "tensor-missing": Case(missing_tensor, ("q_proj", "incomplete")),
    "expert-tensor-missing": Case(missing_expert_tensor, ("down_proj", "missing")),
    "tensor-wrong-shape": Case(wrong_shape, ("shape",)),
    "unknown-quant-method": Case(unknown_quant_method, ("superquant9000",)),
    "no-tokenizer": Case(no_tokenizer, ("tokenizer",)),
    "data-empty": Case(_data(lambda p: p.write_text(""), "empty.txt"), ("empty.txt",)),
    "data-shorter-than-a-window": Case(_data(lambda p: p.write_text("tiny"), "short.txt"), ("short.txt",)),
    "data-binary": Case(_data(lambda p: p.write_bytes(bytes(range(256)) * 64), "blob.txt"), ("blob.txt",)),
    "data-wrong-field": Case(_data(lambda p: p.write_text('{"content": "hello world"}\n' * 50), "rows.jsonl"),
                             ("text",)),
    "data-unknown-format": Case(_data(lambda p: p.write_text("a,b\n1,2\n"), "table.xlsx"), ("table.xlsx",)),
    "data-missing-file": Case(_options("calibrate", "{model}", "--data", "/no/such/file.txt", *CALIB, "-o", "{out}"),
                              ("/no/such/file.txt",)),
    "ratio-out-of-range": Case(_options("prune", "{model}", "--ratio", "1.5", "-o", "{out}"), ("ratio",)),
    "ratio-below-top-k": Case(_options("prune", "{model}", "--method", "frequency", "--ratio", "0.99", *CALIB,
                                       "-o", "{out}"), ("top",)),
    "bits-below-narrowest-candidate": Case(_options("quantize", "{model}", "--bits", "1.5", "-o", "{out}"),
                                           ("--bits",)),
    "size-too-small": Case(_options("quantize", "{model}", "--size", "1KB", *CALIB, "-o", "{out}"), ("--size",)),
    "unknown-method": Case(_options("prune", "{model}", "--method", "magic", "--ratio", "0.5", "-o", "{out}"),
                           ("magic",)),
    "unknown-quant-method-option": Case(_options("quantize", "{model}", "--bits", "3", "--method", "magic",
                                                 "-o", "{out}"), ("magic",)),
    "cuda-without-gpu": Case(_options("calibrate", "{model}", "--device", "cuda", *CALIB, "-o", "{out}"), ("cuda",)),
    "quantize-cuda-without-gpu": Case(_options("quantize", "{model}", "--bits", "3", "--device", "cuda", *CALIB,
                                               "-o", "{out}"), ("cuda", "--device cpu")),
    "stats-of-another-model": Case(stats_of_another_model, ("stats",)),
    "recipe-names-missing-file": Case(recipe_missing_file, ("no-such-file.txt",)),
    "output-not-empty": Case(output_not_empty, ("--force",)),
    "output-read-only": Case(read_only_output, ("read-only", "writable disk")),
    "disk-fills-up": Case(disk_fills_up, ("disk is full", "room")),
}


MOUNTS: list[Path] = []  # tmpfs mounts made by the current case, unmounted after it


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("good") / "model")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_line(name: str, good_checkpoint: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    if name.endswith("cuda-without-gpu") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")  # listed in tests/expected_skips.py
    case = CASES[name]
    model = Path(shutil.copytree(good_checkpoint, tmp_path / "model"))
    work = tmp_path / "work"
    work.mkdir()
    try:
        _check_case(name, case, model, work, monkeypatch, capsys)
    finally:
        import subprocess

        while MOUNTS:
            subprocess.run(["umount", "--lazy", str(MOUNTS.pop())], check=True)  # lazy: a handle may still be open


def _check_case(name: str, case: Case, model: Path, work: Path, monkeypatch, capsys) -> None:
    argv = case.breaks(model, work)
    before = digest(model)
    output = Path(argv[argv.index("-o") + 1]) if "-o" in argv else work / "out"
    existed = digest(output) if output.exists() else None
    code, out, err = run_cli(argv, monkeypatch, capsys)
    assert code != 0, f"{name}: exit 0\n{out}\n{err}"
    lines = error_lines(err)
    assert len(lines) == 1, f"{name}: expected one error line, got:\n{err}"
    print(f"matrix case {name}: {lines[0]}")  # the case list with its messages (pytest -s shows it)
    line = lines[0].lower()
    assert all(word.lower() in line for word in case.expect), f"{name}: {lines[0]!r} lacks {case.expect}"
    assert digest(model) == before, f"{name}: the input folder changed"
    if existed is None:
        assert not output.exists() or not any(output.iterdir()), f"{name}: an output folder appeared"
        leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]
        assert not leftovers, f"{name}: a temporary output folder was left behind: {leftovers}"
    else:
        assert digest(output) == existed, f"{name}: the existing output folder changed"
