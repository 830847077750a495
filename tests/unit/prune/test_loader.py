"""`moecompress.load` dispatch: stock folders, layouts, GPTQ folders; and `import moecompress` stays lean."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import moecompress
from moecompress.errors import MoecompressError
from moecompress.loader import checkpoint_kind
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    model.save_pretrained(folder)
    return folder, model


def test_import_is_lean() -> None:
    code = "import sys, moecompress; print('torch' in sys.modules, callable(moecompress.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False" and out[1] == "True"


def test_plain_folder_loads_with_transformers(saved) -> None:
    folder, model = saved
    assert checkpoint_kind(folder) == "transformers"
    loaded = moecompress.load(folder, dtype="float32")
    ids = token_batch(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert not loaded.training


def test_gptq_folders_go_to_the_quant_loader(saved, tmp_path, monkeypatch) -> None:
    import moecompress.quant.load as quant_load

    folder, model = saved
    target = tmp_path / "gptq"
    target.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (target / "config.json").write_text(json.dumps(config))
    assert checkpoint_kind(target) == "gptq"
    calls = []

    def fake_load(path, dtype, dequantize):
        calls.append((path, dtype, dequantize))
        return model, None

    monkeypatch.setattr(quant_load, "load_quantized", fake_load)
    assert moecompress.load(target, dtype="bfloat16") is model
    assert moecompress.load(target, dequantize="use") is model
    assert calls == [(target, "bfloat16", "load"), (target, "float32", "use")]
    with pytest.raises(MoecompressError, match="dequantize must be one of load, use"):
        moecompress.load(target, dequantize="never")


def test_bad_folders(tmp_path) -> None:
    with pytest.raises(MoecompressError, match="config.json"):
        moecompress.load(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(MoecompressError, match="not valid JSON"):
        moecompress.load(tmp_path)
